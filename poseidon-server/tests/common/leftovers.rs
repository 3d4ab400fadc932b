//! Removing what a test's server leaves on the host. Runners outlive a killed server by design
//! (the next start on the same data directory reattaches to them), and so do their cgroups and
//! the instance's bridge and nftables table; but a test's data directory goes with the test, so
//! no start ever would.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Kills the runners whose control sockets lie under `data_dir` (their inits, and with them
/// their pid namespaces), then removes their cgroups and the instance's bridge and nftables
/// table. Best effort, for after the server is gone.
pub fn remove_sandboxes(data_dir: &Path) {
    let Ok(data_dir) = std::fs::canonicalize(data_dir) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut cgroups = Vec::new();
    // A runner the server was creating when it died still comes up (its helper carries on), so
    // look again, a moment later, until a look finds none.
    for look in 0..4 {
        let inits = holders_of(&socket_inodes_under(&data_dir));
        if inits.is_empty() {
            if look > 0 || !data_dir.join("run").is_dir() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        cgroups.extend(inits.iter().flat_map(|pid| cgroup_dirs(*pid)));
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(inits.iter().map(i32::to_string))
            .output();
        while inits.iter().any(|pid| is_running(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for dir in &cgroups {
        remove_cgroup_tree(dir, deadline);
        if let Some(instance) = dir.parent() {
            let _ = std::fs::remove_dir(instance);
        }
    }
    let tag = local_network::instance_tag(&data_dir);
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", &format!("poseidon_{tag}")])
        .output();
    let _ = Command::new("ip")
        .args(["link", "delete", &format!("pb-{tag}")])
        .output();
}

/// The inodes of the unix sockets bound to paths under `dir` (`/proc/net/unix`, host namespace).
fn socket_inodes_under(dir: &Path) -> HashSet<String> {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (inode, path) = (fields.get(6)?, fields.get(7)?);
            Path::new(path).starts_with(dir).then(|| inode.to_string())
        })
        .collect()
}

/// The processes holding one of the sockets `inodes`.
fn holders_of(inodes: &HashSet<String>) -> Vec<i32> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|target| {
                    let target = target.to_str()?.to_string();
                    Some(
                        target
                            .strip_prefix("socket:[")?
                            .strip_suffix(']')?
                            .to_string(),
                    )
                })
                .any(|inode| inodes.contains(&inode))
        })
        .collect()
}

/// The runner cgroup directories of `pid` (those of a `poseidon-*` instance), in every hierarchy.
fn cgroup_dirs(pid: i32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !path.contains("/poseidon-") {
            continue;
        }
        let path = path.trim_start_matches('/');
        let roots: Vec<String> = if controllers.is_empty() {
            vec![String::new()]
        } else {
            let mut roots = vec![controllers.to_string()];
            roots.extend(controllers.split(',').map(str::to_string));
            roots
        };
        for root in roots {
            let dir = Path::new("/sys/fs/cgroup").join(root).join(path);
            if dir.is_dir() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// Whether `pid` still runs (not gone, not a zombie).
fn is_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, s)| !s.starts_with(" Z"))
    })
}

/// Removes the cgroup `dir` and its children, deepest first, retrying until `deadline` while
/// their last processes exit.
fn remove_cgroup_tree(dir: &Path, deadline: Instant) {
    loop {
        let children: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        for child in &children {
            remove_cgroup_tree(child, deadline);
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
