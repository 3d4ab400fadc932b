//! A runner cannot see or reach the host, other runners, or its own way out.

mod common;

use common::{Fixture, request, run, run_with};
use runner_core::{ExecutorApi, RunnerId};

async fn root(f: &Fixture, r: &RunnerId, cmd: &str) -> common::Outcome {
    let mut req = request(cmd);
    req.privileged_execution = true;
    run_with(&f.executor, r, req, None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn runners_cannot_see_each_others_files_or_processes() {
    let f = Fixture::new().await;
    let a = f.runner().await;
    let b = f.runner().await;
    let o = root(
        &f,
        &a,
        "echo a > /workspace/secret; echo a > /tmp/secret; echo x >> /etc/os-release; sleep 1000 &",
    )
    .await;
    assert_eq!(o.code(), Some(0), "{}", o.err());
    let o = root(&f, &b, "cat /workspace/secret /tmp/secret; ls -A /workspace /tmp; grep -c '^x$' /etc/os-release; ls /proc | grep -c '^[0-9]'").await;
    assert!(!o.out().contains("a\r\n"), "{}", o.out());
    assert!(o.err().contains("No such file"), "{}", o.err());
    let out = o.out();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.trim() == "0").count(),
        1,
        "{lines:?}"
    );
    let procs: usize = lines.last().unwrap().trim().parse().unwrap();
    assert!(procs < 8, "runner b sees {procs} processes");
    f.destroy(&a).await;
    f.destroy(&b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_secrets_and_directories_are_absent() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let data = f.dir.path().display().to_string();
    for cmd in [
        "cat /etc/shadow".to_string(),
        "cat /etc/gshadow".to_string(),
        "ls /work".to_string(),
        format!("ls {data}"),
        "ls /root/.cargo".to_string(),
        "ls /sys/fs/cgroup".to_string(),
        "ls /etc/ssh".to_string(),
    ] {
        for o in [run(&f.executor, &r, &cmd).await, root(&f, &r, &cmd).await] {
            assert_ne!(o.code(), Some(0), "{cmd} succeeded: {}", o.out());
        }
    }
    let o = run(
        &f.executor,
        &r,
        "ls /home; grep -c . /etc/passwd; ls -ld /usr | awk '{print $3}'",
    )
    .await;
    assert_eq!(o.out(), "user\r\n3\r\nroot\r\n");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_loopback_services_are_unreachable() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let o = root(&f, &r, &format!("echo hi > /dev/tcp/127.0.0.1/{port}")).await;
    assert_ne!(o.code(), Some(0));
    assert!(o.err().contains("Connection refused"), "{}", o.err());
    assert!(
        listener.accept().is_err(),
        "the host listener got a connection"
    );
    // Loopback inside the runner works.
    let o = run(
        &f.executor,
        &r,
        "python3 -c \"import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); c=socket.create_connection(s.getsockname()); print('ok')\"",
    )
    .await;
    assert_eq!(o.out(), "ok\r\n", "{}", o.err());
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_root_cannot_remount_unmount_or_escape() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    for cmd in [
        "mount -o remount,rw /usr",
        "umount /etc",
        "umount -l /proc",
        "mount -t tmpfs none /mnt",
        "touch /usr/escape",
        "unshare -U true",
        "unshare -m true",
        "chroot / true",
        "echo 1 > /proc/sys/kernel/sysrq",
        "hostname evil",
        "ip link set lo down",
        "cat /proc/1/environ",
    ] {
        let o = root(&f, &r, cmd).await;
        assert_ne!(o.code(), Some(0), "{cmd} succeeded as sandbox root");
    }
    let o = root(
        &f,
        &r,
        "id -u; echo x > /etc/new && cat /etc/new; ls /usr/bin/bash",
    )
    .await;
    assert_eq!(o.out(), "0\r\nx\r\n/usr/bin/bash\r\n", "{}", o.err());
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_init_survives_garbage_on_its_control_socket() {
    use std::io::Write;
    let f = Fixture::new().await;
    let r = f.runner().await;
    let run_dir = std::fs::canonicalize(f.dir.path()).unwrap().join("run");
    let socket = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .next()
        .expect("control socket")
        .path();
    let garbage: [&[u8]; 4] = [
        b"\xff\xff\xff\xffxxxx",
        b"\x00\x00\x00\x05{{{{{",
        b"\x00\x00\x00\x40{\"op\":\"exec\",\"command\":\"a\\u0000b\",\"privileged\":true,\"env\":[]}",
        b"\x00\x00",
    ];
    for g in garbage {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        let _ = s.write_all(g);
    }
    // A client that connects and says nothing does not block the init for others for long.
    let _idle = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    assert_eq!(
        run(&f.executor, &r, "echo still here").await.out(),
        "still here\r\n"
    );
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn descriptors_the_server_inherited_never_reach_a_runner() {
    // A descriptor without close-on-exec, as a socket-activating parent or a harness leaves one.
    let leaked = std::fs::File::open("/etc/hostname").expect("open");
    rustix::io::fcntl_setfd(&leaked, rustix::io::FdFlags::empty()).expect("clear CLOEXEC");
    let f = Fixture::new().await;
    let r = f.runner().await;
    let mut req = request("ls /proc/self/fd; readlink /proc/self/fd/* || true");
    req.privileged_execution = true;
    let out = run_with(&f.executor, &r, req, None).await;
    let listed: Vec<u32> = out
        .out()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        listed.iter().all(|fd| *fd <= 3),
        "an execution holds more than stdio and ls's own directory: {}",
        out.out()
    );
    assert!(!out.out().contains("hostname"), "{}", out.out());
    drop(leaked);
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn per_user_kernel_limits_are_not_shared_with_host_root_or_other_runners() {
    let f = Fixture::new().await;
    let (a, b) = (f.runner().await, f.runner().await);
    // Runner A takes every inotify instance the kernel grants it and holds them.
    let hog = request(
        "python3 -c \"import ctypes,sys,time\nlibc=ctypes.CDLL(None)\nfds=[]\n\
         while len(fds)<100000:\n    fd=libc.inotify_init()\n    if fd<0: break\n    fds.append(fd)\n\
         print('held', len(fds), flush=True)\ntime.sleep(20)\"",
    );
    let handle = f
        .executor
        .execute(&a, &hog, tokio_util::sync::CancellationToken::new())
        .await
        .expect("execute");
    let mut events = handle.events;
    let mut seen = String::new();
    while !seen.contains("held") {
        match tokio::time::timeout(std::time::Duration::from_secs(30), events.recv()).await {
            Ok(Some(runner_core::ExecutionEvent::Stdout(b))) => {
                seen.push_str(&String::from_utf8_lossy(&b))
            }
            Ok(Some(other)) => panic!("the hog ended early: {other:?} after {seen:?}"),
            Ok(None) | Err(_) => panic!("the hog never reported: {seen:?}"),
        }
    }
    // Host root (this test process) and runner B still get theirs.
    let host = rustix::fs::inotify::init(rustix::fs::inotify::CreateFlags::CLOEXEC);
    assert!(
        host.is_ok(),
        "host root lost inotify to a runner ({seen:?}): {host:?}"
    );
    let other = run(
        &f.executor,
        &b,
        "python3 -c \"import ctypes; print('fd', ctypes.CDLL(None).inotify_init() >= 0)\"",
    )
    .await;
    assert!(
        other.out().contains("fd True"),
        "another runner lost inotify: {}",
        other.out()
    );
    drop(events);
    f.destroy(&a).await;
    f.destroy(&b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn vsock_sockets_are_refused_even_to_sandbox_root() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let o = root(
        &f,
        &r,
        "python3 -c \"import socket\ntry:\n    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n    print('created')\nexcept OSError as e:\n    print('refused', e.errno)\"",
    )
    .await;
    assert!(o.out().starts_with("refused"), "{} {}", o.out(), o.err());
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_information_names_no_host_path_of_the_data_directory() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let o = run(&f.executor, &r, "cat /proc/self/mountinfo").await;
    assert!(o.out().contains(" /etc "), "{}", o.out());
    let data = f.dir.path().to_string_lossy().to_string();
    assert!(
        !o.out().contains(&data),
        "mountinfo reveals the data directory {data}: {}",
        o.out()
    );
    f.destroy(&r).await;
}

/// The host pid of a runner's init, from the network namespace path the executor gives out.
fn init_pid(f: &Fixture, r: &RunnerId) -> u32 {
    let netns = f.executor.network_namespace(r).expect("a live runner");
    netns
        .to_str()
        .and_then(|p| p.strip_prefix("/proc/"))
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("/proc/<pid>/ns/net")
}

fn proc_field(pid: u32, file: &str, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_root_cannot_limit_stop_or_slow_down_the_init() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let pid = init_pid(&f, &r);
    let before = (
        proc_field(pid, "limits", "Max open files"),
        proc_field(pid, "limits", "Max processes"),
        proc_field(pid, "limits", "Max cpu time"),
        proc_field(pid, "stat", ""),
    );
    let attack = "prlimit --pid 1 --nofile=3:3 --nproc=1:1 --cpu=1:1 --as=1000000:1000000; \
                  renice -n 19 -p 1; chrt --idle -p 0 1; taskset -p 1 1; ionice -c 3 -p 1; \
                  echo 1000 > /proc/1/oom_score_adj; kill -STOP 1; kill -KILL 1; \
                  head -c 1 /proc/1/mem; ls /proc/1/fd; echo done";
    let o = root(&f, &r, attack).await;
    assert!(o.out().contains("done"), "{o:?}");
    let after = (
        proc_field(pid, "limits", "Max open files"),
        proc_field(pid, "limits", "Max processes"),
        proc_field(pid, "limits", "Max cpu time"),
        proc_field(pid, "stat", ""),
    );
    assert_eq!(before.0, after.0, "{o:?}");
    assert_eq!(before.1, after.1, "{o:?}");
    assert_eq!(before.2, after.2, "{o:?}");
    // Fields after the command: state … priority (16), nice (17) … policy (39).
    let fields = |stat: &str| -> Vec<String> {
        stat.rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let (b, a) = (fields(&before.3), fields(&after.3));
    // Running or sleeping (in a system call too, e.g. removing a finished execution's
    // cgroup), but neither stopped nor gone.
    assert!(
        matches!(a.first().map(String::as_str), Some("S" | "R" | "D")),
        "init state {a:?}"
    );
    assert_eq!(b.get(16), a.get(16), "nice changed: {o:?}");
    assert_eq!(b.get(38), a.get(38), "scheduling policy changed: {o:?}");
    assert_eq!(
        proc_field(pid, "status", "Cpus_allowed_list"),
        proc_field(std::process::id(), "status", "Cpus_allowed_list"),
        "affinity changed"
    );
    assert_ne!(
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap_or_default()
            .trim(),
        "1000"
    );
    // The control plane answers at once.
    let started = std::time::Instant::now();
    let listed = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        f.executor.list_files(
            &r,
            &runner_core::ListFilesRequest {
                path: "./".into(),
                recursive: false,
                privileged: false,
            },
        ),
    )
    .await
    .expect("listing hung");
    assert!(listed.is_ok(), "{listed:?}");
    let o = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        run(&f.executor, &r, "echo alive"),
    )
    .await
    .expect("execution hung");
    assert_eq!(o.out(), "alive\r\n");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_init_that_stops_answering_fails_requests_within_seconds_and_is_replaced() {
    use futures::StreamExt;
    let f = Fixture::new().await;
    let mut events = f.executor.events();
    let r = f.runner().await;
    let pid = init_pid(&f, &r);
    // Nothing in the runner can do this any more; the host's root can, and it stands for any
    // way an init may stop serving (a kernel bug, a frozen cgroup).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let listed = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        f.executor.list_files(
            &r,
            &runner_core::ListFilesRequest {
                path: "./".into(),
                recursive: false,
                privileged: false,
            },
        ),
    )
    .await
    .expect("listing hung");
    let message = format!("{listed:?}");
    assert!(listed.is_err());
    assert!(message.contains("did not answer"), "{message}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), events.next())
        .await
        .expect("no event");
    match stopped {
        Some(runner_core::BackendEvent::RunnerStopped { runner, .. }) => assert_eq!(runner, r),
        other => panic!("expected the runner to be reported stopped, got {other:?}"),
    }
    assert!(f.executor.network_namespace(&r).is_none());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true),
        "the broken init still runs"
    );
    // Executions on it fail at once rather than hang.
    let exec = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        f.executor.execute(
            &r,
            &request("true"),
            tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    .expect("execute hung");
    assert!(exec.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_a_runner_reads_names_a_host_path_device_or_id() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let pid = init_pid(&f, &r);
    let uid_map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    let host_ids: Vec<String> = uid_map
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(str::to_string)
        .collect();
    let exe = std::env::current_exe().unwrap();
    let data = std::fs::canonicalize(f.dir.path()).unwrap();
    let mut secrets = vec![
        exe.to_string_lossy().into_owned(),
        data.to_string_lossy().into_owned(),
        "/work/".to_string(),
    ];
    secrets.extend(host_ids.iter().map(|id| format!("={id}")));
    // The host's block devices, by name and by number.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in host_mounts.lines() {
        let (left, right) = line.split_once(" - ").unwrap_or((line, ""));
        let source = right.split_whitespace().nth(1).unwrap_or("");
        if source.starts_with("/dev/") {
            secrets.push(format!(" {source} "));
            if let Some(dev) = left.split_whitespace().nth(2) {
                secrets.push(format!(" {dev} "));
            }
        }
    }
    secrets.sort();
    secrets.dedup();
    let cmd = "cat /proc/net/unix /proc/self/mountinfo /proc/mounts /proc/self/mountstats \
               /proc/self/cgroup /proc/1/cmdline /proc/1/environ /proc/self/environ; \
               cat /proc/1/mountinfo; env; hostname; ls -l /proc/1/ 2>&1; true";
    for o in [run(&f.executor, &r, cmd).await, root(&f, &r, cmd).await] {
        let text = format!("{}\n{}", o.out(), o.err());
        assert!(text.contains(" /etc "), "{text}");
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a runner sees {s:?}:\n{text}");
        }
    }
    f.destroy(&r).await;
}
