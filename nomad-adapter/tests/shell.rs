//! The shell side of executions and file operations, run with the host's bash and tools (as
//! they run inside a runner): the stderr FIFO handshake, the kill sweep, tar extraction with
//! the local backend's modes, the listing and the read.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nomad_adapter::command::{self, NOT_FOUND_EXIT};
use nomad_adapter::files;
use runner_core::{ExecutionRequest, FileCopy};

fn spawn(argv: &[String]) -> std::process::Child {
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run(argv: &[String], stdin: &[u8]) -> std::process::Output {
    let mut child = spawn(argv);
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn stderr_goes_through_the_fifo_to_the_second_session_and_the_exit_code_through_the_first() {
    let mut r = ExecutionRequest::new("echo out; echo err >&2; exit 7");
    r.privileged_execution = true;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let c = command::execution(&r, &id, &[]);
    let main = spawn(&c.main);
    let reader = spawn(&c.stderr);
    let main = main.wait_with_output().unwrap();
    let reader = reader.wait_with_output().unwrap();
    assert_eq!(main.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&main.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&reader.stdout), "err\n");
    assert!(reader.status.success());
    assert!(
        !std::path::Path::new(&format!("/tmp/.poseidon-stderr-{id}")).exists(),
        "the FIFO is removed"
    );
}

#[test]
fn the_kill_sweep_ends_the_whole_tree_also_children_in_their_own_session() {
    let mut r = ExecutionRequest::new("setsid sleep 1000 & sleep 1000 & wait");
    r.privileged_execution = true;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let c = command::execution(&r, &id, &[]);
    let mut reader = spawn(&c.stderr);
    let mut main = spawn(&c.main);
    let marked = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("environ"))
                    .map(|env| {
                        env.split(|b| *b == 0)
                            .any(|v| v == format!("EXECUTION_ID={id}").as_bytes())
                    })
                    .unwrap_or(false)
            })
            .count()
    };
    let started = Instant::now();
    while marked() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the tree did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = run(&c.kill, b"");
    assert!(kill.status.success(), "{kill:?}");
    let _ = main.wait();
    let _ = reader.wait();
    let started = Instant::now();
    while marked() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} marked processes survived the kill",
            marked()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn copies_are_extracted_root_owned_0744_dirs_01777_and_failures_named() {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("workspace");
    std::fs::create_dir(&workdir).unwrap();
    std::fs::write(workdir.join("blocker"), "file").unwrap();
    std::fs::write(workdir.join("old.txt"), "old").unwrap();
    let workdir = workdir.to_str().unwrap().to_string();
    let copy = |path: &str, content: &'static str| FileCopy {
        path: path.into(),
        content: Bytes::from_static(content.as_bytes()),
    };
    let copies = vec![
        copy("kit/a.txt", "alpha"),
        copy("kit/sub/", ""),
        copy("blocker/x", "cannot"),
        copy(&format!("{workdir}/abs.txt"), "absolute"),
    ];
    let archive = files::archive(&workdir, &copies).unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let out = run(&command::update(&workdir, &["old.txt".into()]), &archive);
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failures = files::failures(&workdir, &copies, &stderr);
    assert_eq!(failures.len(), 1, "{stderr}");
    assert_eq!(failures[0].path, "blocker/x");
    let a = std::fs::metadata(format!("{workdir}/kit/a.txt")).unwrap();
    assert_eq!(a.permissions().mode() & 0o7777, 0o744);
    assert_eq!((a.uid(), a.gid()), (0, 0));
    assert!(a.mtime() >= before - 5, "extracted files are dated now");
    let sub = std::fs::metadata(format!("{workdir}/kit/sub")).unwrap();
    assert_eq!(sub.permissions().mode() & 0o7777, 0o1777);
    assert_eq!(
        std::fs::read_to_string(format!("{workdir}/abs.txt")).unwrap(),
        "absolute"
    );
    assert!(!std::path::Path::new(&format!("{workdir}/old.txt")).exists());

    // Listing, as the API shows it.
    let out = run(&command::list(&workdir, "kit", false, &[]), b"");
    assert!(out.status.success());
    let listing = files::parse_listing("kit", &out.stdout);
    let names: Vec<&str> = listing.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["kit/a.txt", "kit/sub"]);
    assert_eq!(listing[0].permissions, "rwxr--r--");
    assert_eq!(listing[0].size, 5);
    assert_eq!(listing[0].owner, "root");
    assert_eq!(listing[1].entry_type, 'd');
    std::fs::write(format!("{workdir}/kit/sub/c.txt"), "c").unwrap();
    std::fs::write(format!("{workdir}/kit/.hidden"), "h").unwrap();
    let out = run(&command::list(&workdir, "kit", true, &[]), b"");
    let listing = files::parse_listing("kit", &out.stdout);
    let names: Vec<&str> = listing.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["kit/a.txt", "kit/sub", "kit/sub/c.txt"]);
    let out = run(&command::list(&workdir, "kit/a.txt", false, &[]), b"");
    let listing = files::parse_listing("kit/a.txt", &out.stdout);
    assert_eq!(listing.len(), 1);
    assert_eq!(listing[0].name, "kit/a.txt");
    std::fs::write(format!("{workdir}/-n"), "dash").unwrap();
    let out = run(&command::list(&workdir, "-n", false, &[]), b"");
    assert_eq!(files::parse_listing("-n", &out.stdout)[0].name, "-n");
    let out = run(&command::read(&workdir, "-n", &[]), b"");
    assert_eq!(out.stdout, b"4\ndash");
    let out = run(&command::list(&workdir, "missing", false, &[]), b"");
    assert_eq!(out.status.code(), Some(NOT_FOUND_EXIT));

    // Reading: the size line, then the content.
    let out = run(&command::read(&workdir, "kit/a.txt", &[]), b"");
    assert_eq!(out.stdout, b"5\nalpha");
    let out = run(&command::read(&workdir, "kit/sub", &[]), b"");
    assert_eq!(out.status.code(), Some(NOT_FOUND_EXIT));
    let out = run(&command::read(&workdir, "nope.txt", &[]), b"");
    assert_eq!(out.status.code(), Some(NOT_FOUND_EXIT));
}
