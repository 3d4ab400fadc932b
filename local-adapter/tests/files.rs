//! File operations through `ExecutorApi` against real sandboxes, with Poseidon's semantics.

mod common;

use bytes::Bytes;
use common::{Fixture, request, run, run_with};
use futures::StreamExt;
use runner_core::{ExecutorApi, FileCopy, FileError, FileUpdate, ListFilesRequest, RunnerId};

fn copy(path: &str, content: &str) -> FileCopy {
    FileCopy {
        path: path.into(),
        content: Bytes::from(content.to_string()),
    }
}

fn update(copies: Vec<FileCopy>) -> FileUpdate {
    FileUpdate {
        delete: vec![],
        copy: copies,
    }
}

fn list(path: &str, recursive: bool, privileged: bool) -> ListFilesRequest {
    ListFilesRequest {
        path: path.into(),
        recursive,
        privileged,
    }
}

async fn read(
    f: &Fixture,
    r: &RunnerId,
    path: &str,
    privileged: bool,
) -> Result<Vec<u8>, FileError> {
    let content = f.executor.read_file(r, path, privileged).await?;
    let mut body = content.body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    assert_eq!(out.len() as u64, content.size);
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn copied_files_are_root_owned_0744_and_listed_like_ls() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    assert!(
        f.executor
            .list_files(&r, &list("./", true, false))
            .await
            .unwrap()
            .is_empty()
    );
    f.executor
        .update_files(
            &r,
            &update(vec![
                copy("test.txt", ""),
                copy("relative/file/path.txt", "relative"),
                copy("/tmp/absolute/file/path.txt", "absolute"),
            ]),
        )
        .await
        .unwrap();
    let files = f
        .executor
        .list_files(&r, &list("./", false, false))
        .await
        .unwrap();
    let names: Vec<&str> = files.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["./relative", "./test.txt"]);
    let t = &files[1];
    assert_eq!((t.entry_type, t.size), ('-', 0));
    assert_eq!(t.permissions, "rwxr--r--");
    assert_eq!((t.owner.as_str(), t.group.as_str()), ("root", "root"));
    assert_eq!(files[0].entry_type, 'd');
    let all = f
        .executor
        .list_files(&r, &list("./", true, false))
        .await
        .unwrap();
    let names: Vec<&str> = all.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "./relative",
            "./test.txt",
            "./relative/file",
            "./relative/file/path.txt"
        ]
    );
    let o = run(
        &f.executor,
        &r,
        "cat relative/file/path.txt /tmp/absolute/file/path.txt",
    )
    .await;
    assert_eq!(o.out(), "relativeabsolute");
    // The helper's own /proc describes a host process: it is not served.
    let own = f
        .executor
        .list_files(&r, &list("/proc/self/cwd", false, false))
        .await;
    assert!(matches!(own, Err(FileError::NotFound)), "{own:?}");
    let init_cwd = f
        .executor
        .list_files(&r, &list("/proc/1/cwd", false, false))
        .await
        .unwrap();
    assert_eq!(init_cwd[0].entry_type, 'l');
    assert_eq!(init_cwd[0].link_target, None);
    f.destroy(&r).await;
}

/// Files created in a directory whose new files take another group (set-group-ID), files that
/// existed already with another owner and mode, and a batch into one directory all end up
/// root-owned 0744, whichever way the helper created them.
#[tokio::test(flavor = "multi_thread")]
async fn copies_end_up_root_owned_0744_in_set_group_id_dirs_and_over_existing_files() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let mut setup = request(
        "mkdir -p sgid plain && chown 1000:1000 sgid && chmod 2777 sgid \
         && echo old > plain/old.txt && chown 1000:1000 plain/old.txt && chmod 0600 plain/old.txt",
    );
    setup.privileged_execution = true;
    let o = run_with(&f.executor, &r, setup, None).await;
    assert_eq!(o.code(), Some(0), "{}", o.err());
    let mut copies = vec![copy("sgid/a.txt", "A"), copy("plain/old.txt", "new")];
    copies.extend((0..20).map(|i| copy(&format!("plain/f{i}.txt"), "F")));
    copies.push(copy("sgid/b.txt", "B"));
    f.executor.update_files(&r, &update(copies)).await.unwrap();
    let o = run(
        &f.executor,
        &r,
        "stat -c '%n %U:%G %a' sgid/a.txt sgid/b.txt plain/old.txt plain/f0.txt plain/f19.txt \
         && cat plain/old.txt sgid/b.txt",
    )
    .await;
    assert_eq!(
        o.out(),
        "sgid/a.txt root:root 744\r\nsgid/b.txt root:root 744\r\nplain/old.txt root:root 744\r\n\
         plain/f0.txt root:root 744\r\nplain/f19.txt root:root 744\r\nnewB",
        "{}",
        o.err()
    );
    let listed = f
        .executor
        .list_files(&r, &list("plain", false, false))
        .await
        .unwrap();
    assert_eq!(listed.len(), 21);
    assert!(
        listed.iter().all(
            |h| (h.owner.as_str(), h.group.as_str(), h.permissions.as_str())
                == ("root", "root", "rwxr--r--")
        ),
        "{listed:?}"
    );
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deletes_happen_before_copies() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    f.executor
        .update_files(&r, &update(vec![copy("a.txt", "A"), copy("d/b.txt", "B")]))
        .await
        .unwrap();
    f.executor
        .update_files(
            &r,
            &FileUpdate {
                delete: vec!["a.txt".into(), "d".into()],
                copy: vec![],
            },
        )
        .await
        .unwrap();
    let o = run(&f.executor, &r, "cat a.txt").await;
    assert!(
        o.err().contains("No such file or directory"),
        "{:?}",
        o.err()
    );
    assert!(!run(&f.executor, &r, "ls").await.out().contains('d'));
    f.executor
        .update_files(
            &r,
            &FileUpdate {
                delete: vec!["c.txt".into()],
                copy: vec![copy("c.txt", "C")],
            },
        )
        .await
        .unwrap();
    assert_eq!(run(&f.executor, &r, "cat c.txt").await.out(), "C");
    f.executor
        .update_files(
            &r,
            &update(vec![copy(".hidden", "H"), copy(".hdir/x", "X")]),
        )
        .await
        .unwrap();
    f.executor
        .update_files(
            &r,
            &FileUpdate {
                delete: vec!["./*".into()],
                copy: vec![],
            },
        )
        .await
        .unwrap();
    // `./*` is the shell glob Poseidon runs: dotfiles stay.
    assert_eq!(
        run(&f.executor, &r, "ls -A | tr '\\n' ' '").await.out(),
        ".hdir .hidden "
    );
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn protected_folders_let_user_add_but_not_remove_root_files() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    f.executor
        .update_files(
            &r,
            &update(vec![
                copy("protectedFolder/", ""),
                copy("protectedFolder/test.txt", "orig"),
            ]),
        )
        .await
        .unwrap();
    let dir = f
        .executor
        .list_files(&r, &list("./", false, false))
        .await
        .unwrap();
    assert_eq!(dir[0].permissions, "rwxrwxrwt");
    let o = run(&f.executor, &r, "touch protectedFolder/userfile").await;
    assert_eq!(
        (o.out(), o.err(), o.code()),
        (String::new(), String::new(), Some(0))
    );
    let o = run(&f.executor, &r, "rm -f protectedFolder/test.txt").await;
    assert!(o.err().contains("Operation not permitted"), "{:?}", o.err());
    let o = run(&f.executor, &r, "rm -fr protectedFolder/").await;
    assert!(o.err().contains("Operation not permitted"), "{:?}", o.err());
    let o = run(&f.executor, &r, "echo Hi >> protectedFolder/test.txt").await;
    assert!(o.err().contains("Permission denied"), "{:?}", o.err());
    assert_eq!(
        read(&f, &r, "protectedFolder/test.txt", false)
            .await
            .unwrap(),
        b"orig"
    );
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_failed_path_is_named_and_the_others_are_written() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let err = f
        .executor
        .update_files(
            &r,
            &update(vec![copy("/proc/1/environ", "x"), copy("test.txt", "ok")]),
        )
        .await
        .unwrap_err();
    match err {
        FileError::Partial(failures) => {
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].path, "/proc/1/environ");
            assert!(
                failures[0].reason.starts_with("Cannot open: "),
                "{failures:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(run(&f.executor, &r, "cat test.txt").await.out(), "ok");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_file_streams_exact_bytes_or_reports_not_found() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    assert!(matches!(
        read(&f, &r, "test.txt", false).await,
        Err(FileError::NotFound)
    ));
    let content: String = (0..100_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    f.executor
        .update_files(&r, &update(vec![copy("test.txt", &content)]))
        .await
        .unwrap();
    assert_eq!(
        read(&f, &r, "test.txt", false).await.unwrap(),
        content.as_bytes()
    );
    assert!(matches!(
        read(&f, &r, "/proc/1/environ", false).await,
        Err(FileError::NotFound)
    ));
    assert!(matches!(
        read(&f, &r, "./", false).await,
        Err(FileError::NotFound)
    ));
    // What `user` cannot read stays hidden without privilege.
    let mut req = request("echo secret > /root/secret.txt; chmod 600 /root/secret.txt");
    req.privileged_execution = true;
    assert_eq!(run_with(&f.executor, &r, req, None).await.code(), Some(0));
    assert!(matches!(
        read(&f, &r, "/root/secret.txt", false).await,
        Err(FileError::NotFound)
    ));
    assert_eq!(
        read(&f, &r, "/root/secret.txt", true).await.unwrap(),
        b"secret\n"
    );
    assert!(matches!(
        f.executor
            .list_files(&r, &list("/root", false, false))
            .await,
        Err(FileError::NotFound)
    ));
    assert_eq!(
        f.executor
            .list_files(&r, &list("/root", false, true))
            .await
            .unwrap()
            .len(),
        1
    );
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn planted_symlinks_and_dot_dots_stay_inside_the_runner() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let host = tempfile::tempdir().unwrap();
    let marker = host.path().join("marker.txt");
    std::fs::write(&marker, "host secret").unwrap();
    let marker = marker.to_string_lossy().into_owned();
    let o = run(
        &f.executor,
        &r,
        &format!(
            "ln -s {marker} m; ln -s / root; ln -s /etc/shadow s; ln -s {} hostdir",
            host.path().display()
        ),
    )
    .await;
    assert_eq!(o.code(), Some(0), "{}", o.err());
    for path in [
        "m",
        "s",
        "../../../../etc/shadow",
        &marker,
        "root/etc/shadow",
    ] {
        for privileged in [false, true] {
            assert!(
                matches!(
                    read(&f, &r, path, privileged).await,
                    Err(FileError::NotFound)
                ),
                "{path} was readable"
            );
        }
    }
    let escape = "hostdir/escape.txt".to_string();
    let _ = f
        .executor
        .update_files(
            &r,
            &update(vec![
                copy(&escape, "x"),
                copy("../../../..//tmp/dots.txt", "y"),
                copy("m", "z"),
            ]),
        )
        .await;
    assert!(!host.path().join("escape.txt").exists());
    assert_eq!(
        std::fs::read_to_string(host.path().join("marker.txt")).unwrap(),
        "host secret"
    );
    // `..` beyond the root stays at the runner's root.
    assert_eq!(run(&f.executor, &r, "cat /tmp/dots.txt").await.out(), "y");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn planted_descriptor_links_lead_nowhere_outside_the_runner() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let plant = "for n in 3 4 5 6 7 8 9 10; do ln -s /proc/self/fd/$n/../../.. /workspace/l$n; ln -s /proc/self/fd/$n /workspace/d$n; done";
    assert_eq!(run(&f.executor, &r, plant).await.code(), Some(0));
    for n in 3..=10 {
        for (name, privileged) in [
            (format!("l{n}"), true),
            (format!("d{n}"), true),
            (format!("l{n}"), false),
        ] {
            let listed = f
                .executor
                .list_files(&r, &list(&format!("/workspace/{name}/"), true, privileged))
                .await;
            if let Ok(entries) = listed {
                let host = entries.iter().find(|e| {
                    e.name.contains("cgroup.procs")
                        || e.name.contains("memory.limit_in_bytes")
                        || e.name.contains("poseidon-")
                });
                assert!(host.is_none(), "{name} reached the host: {host:?}");
            }
        }
    }
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_whose_helper_is_stopped_fails_instead_of_hanging() {
    let f = Fixture::with(|c| c.stall_timeout = std::time::Duration::from_secs(2)).await;
    let r = f.runner().await;
    let made = run(
        &f.executor,
        &r,
        "head -c 8000000 /dev/zero > /workspace/big",
    )
    .await;
    assert_eq!(made.code(), Some(0), "{}", made.err());
    let content = f.executor.read_file(&r, "big", false).await.unwrap();
    let mut body = content.body;
    let first = body.next().await.expect("a first chunk").unwrap();
    assert!(!first.is_empty());
    // The runner's own code stops the process that serves the download.
    // Its /proc/<pid>/fd is closed even to sandbox root, so find it as the one process of
    // `user` whose parent is the init.
    let mut stop = request(
        "for p in /proc/[0-9]*; do grep -q '^PPid:\\s1$' $p/status && grep -q '^Uid:\\s1000\\s' $p/status \
         && kill -STOP ${p#/proc/} && echo stopped; done; true",
    );
    stop.privileged_execution = true;
    let stopped = run_with(&f.executor, &r, stop, None).await;
    assert!(stopped.out().contains("stopped"), "{stopped:?}");
    let drained = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            match body.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the download hung");
    assert!(
        matches!(drained, Some(FileError::Backend(_))),
        "a stalled download must end in an error, got {drained:?}"
    );
    // The runner still serves others.
    assert_eq!(run(&f.executor, &r, "echo ok").await.out().trim(), "ok");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_regular_files_are_downloaded_and_generated_ones_whole() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let made = run(&f.executor, &r, "mkfifo /workspace/fifo && echo made").await;
    assert_eq!(made.out().trim(), "made", "{}", made.err());
    for path in ["fifo", "/dev/urandom", "/dev/zero", "/workspace"] {
        let started = std::time::Instant::now();
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            read(&f, &r, path, false),
        )
        .await
        .unwrap_or_else(|_| panic!("downloading {path} hung"));
        assert!(
            matches!(got, Err(FileError::NotFound)),
            "{path}: {:?}",
            got.map(|b| b.len())
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{path}"
        );
    }
    // Files in /proc have no size but content.
    let status = read(&f, &r, "/proc/1/status", false).await.unwrap();
    assert!(String::from_utf8_lossy(&status).contains("Name:"));
    // An empty regular file is still a file.
    assert_eq!(
        run(&f.executor, &r, "touch /workspace/empty").await.code(),
        Some(0)
    );
    assert_eq!(read(&f, &r, "empty", false).await.unwrap(), b"");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_with_tens_of_thousands_of_files_is_written_whole() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let copies: Vec<FileCopy> = (0..30_000)
        .map(|i| FileCopy {
            path: format!("many/file-{i:06}.txt"),
            content: Bytes::new(),
        })
        .collect();
    f.executor
        .update_files(
            &r,
            &FileUpdate {
                delete: vec!["many".into()],
                copy: copies,
            },
        )
        .await
        .expect("a big update");
    assert_eq!(
        run(&f.executor, &r, "ls many | wc -l").await.out().trim(),
        "30000"
    );
    let long = "a/".repeat(3000);
    assert!(matches!(
        f.executor
            .update_files(&r, &update(vec![copy(&long, "x")]))
            .await,
        Err(FileError::InvalidPath(_))
    ));
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_bigger_than_the_runner_fails_by_name_and_the_others_are_written() {
    let f = Fixture::new().await;
    let r = f.runner_with(common::spec(64)).await;
    let big = FileCopy {
        path: "big.bin".into(),
        content: Bytes::from(vec![7u8; 60 << 20]),
    };
    let result = f
        .executor
        .update_files(
            &r,
            &FileUpdate {
                delete: vec![],
                copy: vec![big, copy("small.txt", "small")],
            },
        )
        .await;
    match result {
        Err(FileError::Partial(failures)) => {
            assert_eq!(failures.len(), 1, "{failures:?}");
            assert_eq!(failures[0].path, "big.bin");
            assert!(failures[0].reason.contains("No space"), "{failures:?}");
        }
        other => panic!("expected the big file to fail by name, got {other:?}"),
    }
    assert_eq!(read(&f, &r, "small.txt", false).await.unwrap(), b"small");
    assert_eq!(run(&f.executor, &r, "echo alive").await.out(), "alive\r\n");
    f.destroy(&r).await;
}

/// Host paths a runner must never learn: the test binary (which is also the runners' helper and
/// init, as the server binary is in production) and the data directory.
fn host_paths(f: &Fixture) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let data = std::fs::canonicalize(f.dir.path()).unwrap();
    vec![
        exe.to_string_lossy().into_owned(),
        exe.file_name().unwrap().to_string_lossy().into_owned(),
        data.to_string_lossy().into_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn the_file_api_never_serves_its_own_helper_process() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let plant = "ln -s /proc/self/exe exe; ln -s /proc/self/maps maps; ln -s /proc/self/map_files mf; \
                 ln -s /proc/self/environ env; ln -s /proc/self/cmdline cmd; ln -s /proc/self pself; \
                 ln -s /proc/thread-self tself";
    assert_eq!(run(&f.executor, &r, plant).await.code(), Some(0));
    let secrets = host_paths(&f);
    for path in [
        "exe",
        "maps",
        "env",
        "cmd",
        "pself/exe",
        "pself/maps",
        "pself/smaps",
        "pself/mountinfo",
        "tself/maps",
        "/proc/self/exe",
        "/proc/self/maps",
        "/proc/self/numa_maps",
        "/proc/self/environ",
        "/proc/thread-self/maps",
    ] {
        for privileged in [false, true] {
            match read(&f, &r, path, privileged).await {
                Err(FileError::NotFound) => {}
                Ok(content) => {
                    assert!(
                        !content.starts_with(b"\x7fELF"),
                        "{path} downloads the host's binary"
                    );
                    let text = String::from_utf8_lossy(&content);
                    for s in &secrets {
                        assert!(!text.contains(s.as_str()), "{path} reveals {s}: {text}");
                    }
                }
                Err(e) => panic!("{path}: {e}"),
            }
        }
    }
    for path in [
        "mf/",
        "pself/",
        "pself/map_files/",
        "/proc/self/",
        "/proc/self/map_files/",
        "/proc/thread-self/",
        "/workspace/",
    ] {
        for (recursive, privileged) in [(false, false), (false, true), (true, true)] {
            let Ok(entries) = f
                .executor
                .list_files(&r, &list(path, recursive, privileged))
                .await
            else {
                continue;
            };
            let text = format!("{entries:?}");
            for s in &secrets {
                assert!(
                    !text.contains(s.as_str()),
                    "listing {path} reveals {s}: {text}"
                );
            }
        }
    }
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unprivileged_file_operations_have_no_capabilities() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let mut secret = request("echo s > /root/secret && chmod 600 /root/secret && echo made");
    secret.privileged_execution = true;
    assert_eq!(
        run_with(&f.executor, &r, secret, None).await.out(),
        "made\r\n"
    );
    assert!(matches!(
        read(&f, &r, "/root/secret", false).await,
        Err(FileError::NotFound)
    ));
    assert_eq!(read(&f, &r, "/root/secret", true).await.unwrap(), b"s\n");
    f.destroy(&r).await;
}

/// The init's children that wait for a file operation, forked ahead: they stay in the init's
/// session (a leader, standby or running, has a session of its own).
fn file_helpers(f: &Fixture, r: &RunnerId) -> Vec<i32> {
    let init = f.init_pid(r).expect("a live runner");
    let init_session = common::stat_fields(init).and_then(|s| s.get(3).cloned());
    common::pids()
        .into_iter()
        .filter(|&pid| {
            // Fields after the command: state, ppid, pgrp, session.
            let fields = common::stat_fields(pid).unwrap_or_default();
            fields.first().is_some_and(|s| s != "Z")
                && fields.get(1) == Some(&init.to_string())
                && fields.get(3) == init_session.as_ref()
        })
        .collect()
}

/// Waits until the runner has exactly one file helper waiting, other than `not`.
async fn one_file_helper(f: &Fixture, r: &RunnerId, not: Option<i32>) -> i32 {
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match file_helpers(f, r)[..] {
                [pid] if Some(pid) != not => return pid,
                _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    })
    .await
    .expect("one file helper waiting")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_helper_waits_ahead_once_files_were_served_holding_nothing_of_the_host() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    // A runner that never had a file operation keeps no helper (its standby leader is ready).
    assert_eq!(run(&f.executor, &r, "true").await.code(), Some(0));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(file_helpers(&f, &r), Vec::<i32>::new());

    f.executor
        .update_files(&r, &update(vec![copy("a.txt", "a")]))
        .await
        .unwrap();
    let first = one_file_helper(&f, &r, None).await;
    // Before its request it holds /dev/null as stdio, its handoff socket and the execution
    // namespace: no directory, file or cgroup of the host a planted symlink could reach.
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{first}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    assert_eq!(held.len(), 5, "{held:?}");
    for target in &held {
        assert!(
            target == "/dev/null" || target.starts_with("socket:[") || target.starts_with("user:["),
            "the waiting file helper holds {target}"
        );
    }

    // The next operation takes it, and another is forked ahead.
    let listed = f.executor.list_files(&r, &list("./", false, false)).await;
    assert_eq!(listed.unwrap().len(), 1);
    let second = one_file_helper(&f, &r, Some(first)).await;
    assert!(
        common::stat_fields(first).is_none(),
        "the helper that served the listing is gone"
    );

    // A helper that died while waiting is replaced at the next operation.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // SIGKILL lands asynchronously: a helper handed a request just before would die with it.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while common::stat_fields(second).is_some_and(|f| f.first().is_some_and(|s| s != "Z")) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the killed helper dies");
    assert_eq!(read(&f, &r, "a.txt", false).await.unwrap(), b"a");
    one_file_helper(&f, &r, Some(second)).await;
    f.destroy(&r).await;
}
