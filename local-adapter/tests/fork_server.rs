//! The sandbox fork server: one per executor, helpers that do not linger, a replacement when it
//! dies, and no process left after shutdown. A test binary of its own, as it looks for the fork
//! servers among this process's children.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Fixture, run};

/// The pids of this process's live children that are sandbox fork servers: marked in their
/// environment and, unlike the runners' inits forked from them, in this pid namespace.
fn fork_servers() -> Vec<i32> {
    let me = std::process::id().to_string();
    let our_pid_ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let mut found = Vec::new();
    for pid in common::pids() {
        if is_zombie_child(pid, &me) != Some(false) {
            continue;
        }
        let proc = Path::new("/proc").join(pid.to_string());
        let environ = std::fs::read(proc.join("environ")).unwrap_or_default();
        let marked = environ
            .split(|b| *b == 0)
            .any(|v| v == b"POSEIDON_LOCAL_SANDBOX_HELPER=fork-server");
        if marked && std::fs::read_link(proc.join("ns/pid")).ok() == Some(our_pid_ns.clone()) {
            found.push(pid);
        }
    }
    found
}

/// Whether `pid`, a child of `parent`, is a zombie; `None` when it is no child of `parent`.
fn is_zombie_child(pid: i32, parent: &str) -> Option<bool> {
    let fields = common::stat_fields(pid)?;
    (fields.get(1).map(String::as_str) == Some(parent))
        .then(|| fields.first().map(String::as_str) == Some("Z"))
}

/// The children of `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether `needle` occurs in the private writable memory (heap, stack, data) of `pid`.
fn writable_memory_contains(pid: i32, needle: &[u8]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut searched = 0;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut region = vec![0u8; usize::try_from(end - start).unwrap()];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue;
        }
        searched += region.len();
        if region.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    assert!(searched > 0, "no memory of {pid} could be read");
    false
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_fork_server_starts_runners_and_a_killed_one_is_replaced() {
    let f = Fixture::new().await;
    assert!(fork_servers().is_empty(), "started before the first runner");
    let first = f.runner().await;
    let second = f.runner().await;
    let servers = fork_servers();
    assert_eq!(
        servers.len(),
        1,
        "one fork server per executor: {servers:?}"
    );
    let server = servers[0];
    // The helpers it forked have exited and been reaped; the inits went to this process. Its
    // one child is the next helper, forked ahead and waiting for a request.
    until("the fork server has one child", || {
        children_of(server).len() == 1
    })
    .await;
    // It never reads a request itself, so no runner's data is in the memory every helper and
    // init inherits from it.
    for id in [&first, &second] {
        assert!(
            !writable_memory_contains(server, id.as_str().as_bytes()),
            "the fork server's memory holds runner {id}"
        );
    }
    // (The search does find a runner's id where it is: in that runner's own init.)
    let init: i32 = f
        .executor
        .network_namespace(&second)
        .and_then(|ns| {
            ns.to_str()?
                .strip_prefix("/proc/")?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .expect("the init's pid");
    assert!(writable_memory_contains(init, second.as_str().as_bytes()));
    assert_eq!(run(&f.executor, &first, "echo one").await.out(), "one\r\n");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let me = std::process::id().to_string();
    until("the fork server is dead", || {
        is_zombie_child(server, &me) != Some(false)
    })
    .await;
    // Runners it started are not its children and live on; a new runner gets a new server.
    assert_eq!(run(&f.executor, &second, "echo two").await.out(), "two\r\n");
    let third = f.runner().await;
    assert_eq!(
        run(&f.executor, &third, "echo three").await.out(),
        "three\r\n"
    );
    let servers = fork_servers();
    assert_eq!(servers.len(), 1, "one fork server again: {servers:?}");
    assert_ne!(servers[0], server);
    assert_eq!(is_zombie_child(server, &me), None, "the dead one is reaped");

    for r in [&first, &second, &third] {
        f.destroy(r).await;
    }
    f.executor.shutdown().await;
    assert!(
        fork_servers().is_empty(),
        "the fork server outlived the shutdown"
    );
}
