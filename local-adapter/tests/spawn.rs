//! `LocalExecutor::spawn`: argv as given, pipes or a terminal, resize, kill and exit status.

mod common;

use std::time::Duration;

use common::Fixture;
use local_adapter::{SpawnExit, SpawnRequest, SpawnedProcess};
use runner_core::{BackendError, RunnerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn request(argv: &[&str], tty: bool) -> SpawnRequest {
    SpawnRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        tty,
        privileged: false,
        env: vec![],
    }
}

/// Everything a process wrote, and how it ended.
struct Finished {
    stdout: String,
    stderr: String,
    exit: SpawnExit,
}

/// Reads stdout and stderr to their ends, then waits for the exit (60 s at most).
async fn finish(process: SpawnedProcess) -> Finished {
    let SpawnedProcess {
        stdin,
        mut stdout,
        stderr,
        control,
    } = process;
    let all = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_err = async {
            if let Some(mut stderr) = stderr {
                stderr.read_to_end(&mut err).await.unwrap();
            }
        };
        let (read_out, ()) = tokio::join!(stdout.read_to_end(&mut out), read_err);
        read_out.unwrap();
        let exit = control.wait().await;
        drop(stdin);
        Finished {
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
            exit,
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("the process did not finish")
}

async fn run(f: &Fixture, runner: &RunnerId, request: SpawnRequest) -> Finished {
    let process = f.executor.spawn(runner, request).await.expect("spawn");
    finish(process).await
}

/// Reads from `output` until `want` appears (60 s at most); returns everything read.
async fn read_until(output: &mut local_adapter::ProcessOutput, want: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(60), async {
        while !String::from_utf8_lossy(&seen).contains(want) {
            let n = output.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "output ended before {want:?}: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {want:?} in {:?}", String::from_utf8_lossy(&seen)));
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_tty_argv_is_verbatim_and_stdout_and_stderr_stay_apart() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let done = run(
        &f,
        &r,
        request(&["printf", "%s|", "a b", "$HOME", "x'y\"z", "*"], false),
    )
    .await;
    assert_eq!(done.stdout, "a b|$HOME|x'y\"z|*|");
    assert_eq!(done.exit, SpawnExit::Exited(0));

    let done = run(
        &f,
        &r,
        request(
            &["/bin/sh", "-c", "echo -n hi; echo err >&2; tty; exit 3"],
            false,
        ),
    )
    .await;
    assert_eq!(done.stdout, "hinot a tty\n");
    assert_eq!(done.stderr, "err\n");
    assert_eq!(done.exit, SpawnExit::Exited(3));
    assert_eq!(done.exit.code(), 3);
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_is_a_pipe_and_closing_it_is_eof() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let mut process = f
        .executor
        .spawn(&r, request(&["cat"], false))
        .await
        .unwrap();
    process.stdin.write_all(b"one\ntwo").await.unwrap();
    process.stdin.shutdown().await.unwrap();
    let done = finish(process).await;
    assert_eq!(done.stdout, "one\ntwo");
    assert_eq!(done.exit, SpawnExit::Exited(0));

    // Reopening the pipes by path works, as `tar --file=/dev/stdin` does.
    let mut process = f
        .executor
        .spawn(
            &r,
            request(
                &["/bin/sh", "-c", "cat /dev/stdin > /proc/self/fd/1"],
                false,
            ),
        )
        .await
        .unwrap();
    process.stdin.write_all(b"one\ntwo").await.unwrap();
    process.stdin.shutdown().await.unwrap();
    let done = finish(process).await;
    assert_eq!(done.stdout, "one\ntwo");
    assert_eq!(done.exit, SpawnExit::Exited(0));
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tty_merges_stderr_echoes_input_and_starts_at_80x24() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let done = run(
        &f,
        &r,
        request(
            &["/bin/sh", "-c", "echo out; echo err >&2; stty size; exit 4"],
            true,
        ),
    )
    .await;
    assert!(done.stderr.is_empty());
    assert_eq!(done.stdout, "out\r\nerr\r\n24 80\r\n");
    assert_eq!(done.exit, SpawnExit::Exited(4));

    let mut process = f
        .executor
        .spawn(&r, request(&["head", "-n", "1"], true))
        .await
        .unwrap();
    assert!(process.stderr.is_none());
    process.stdin.write_all(b"Hello World!\n").await.unwrap();
    let done = finish(process).await;
    assert_eq!(done.stdout, "Hello World!\r\nHello World!\r\n");
    assert_eq!(done.exit, SpawnExit::Exited(0));
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resize_is_visible_to_the_process() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let mut process = f
        .executor
        .spawn(
            &r,
            request(&["/bin/sh", "-c", "echo ready; read x; stty size"], true),
        )
        .await
        .unwrap();
    read_until(&mut process.stdout, "ready\r\n").await;
    process.control.resize(50, 132).unwrap();
    process.stdin.write_all(b"go\n").await.unwrap();
    let done = finish(process).await;
    assert!(done.stdout.contains("50 132\r\n"), "{:?}", done.stdout);
    assert_eq!(done.exit, SpawnExit::Exited(0));

    let process = f
        .executor
        .spawn(&r, request(&["true"], false))
        .await
        .unwrap();
    let refused = process.control.resize(50, 132).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn control_characters_signal_the_foreground_job_and_signals_give_128_plus() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let mut process = f
        .executor
        .spawn(
            &r,
            request(&["/bin/sh", "-c", "echo go; exec sleep 100"], true),
        )
        .await
        .unwrap();
    read_until(&mut process.stdout, "go\r\n").await;
    // The shell execs sleep right after its echo; give it the moment to do so, then ^\.
    tokio::time::sleep(Duration::from_millis(200)).await;
    process.stdin.write_all(&[0x1c]).await.unwrap();
    let done = finish(process).await;
    assert_eq!(done.exit, SpawnExit::Exited(131), "{:?}", done.stdout);

    let done = run(&f, &r, request(&["/bin/sh", "-c", "kill -TERM $$"], false)).await;
    assert_eq!(done.exit, SpawnExit::Exited(143));
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_program_is_127_and_bad_argv_is_refused() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let done = run(&f, &r, request(&["no-such-program-here"], false)).await;
    assert_eq!(done.exit, SpawnExit::Exited(127));
    assert!(
        done.stderr.contains("no-such-program-here"),
        "{:?}",
        done.stderr
    );
    let done = run(&f, &r, request(&["/etc/hostname"], false)).await;
    assert_eq!(done.exit, SpawnExit::Exited(126), "{:?}", done.stderr);

    for argv in [vec![], vec!["a\0b".to_string()], vec!["x".repeat(200_000)]] {
        let bad = SpawnRequest {
            argv,
            tty: false,
            privileged: false,
            env: vec![],
        };
        let refused = f.executor.spawn(&r, bad).await.unwrap_err();
        assert!(
            matches!(refused, BackendError::InvalidRequest(_)),
            "{refused:?}"
        );
    }
    let bad_env = SpawnRequest {
        env: vec![("A=B".into(), "c".into())],
        ..request(&["true"], false)
    };
    assert!(matches!(
        f.executor.spawn(&r, bad_env).await.unwrap_err(),
        BackendError::InvalidRequest(_)
    ));
    // The runner still works.
    let done = run(&f, &r, request(&["echo", "fine"], false)).await;
    assert_eq!(done.stdout, "fine\n");
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn users_environment_and_working_directory() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let env_request = SpawnRequest {
        env: vec![("GREETING".into(), "hello there".into())],
        ..request(
            &[
                "/bin/sh",
                "-c",
                "id -u; pwd; echo \"$GREETING\"; echo $HOME",
            ],
            false,
        )
    };
    let done = run(&f, &r, env_request).await;
    assert_eq!(done.stdout, "1000\n/workspace\nhello there\n/home/user\n");

    let root = SpawnRequest {
        privileged: true,
        ..request(&["id", "-u"], false)
    };
    assert_eq!(run(&f, &r, root).await.stdout, "0\n");

    // What the Nomad adapter uses as Poseidon's `/sbin/setuser user`.
    let drop_to_user = SpawnRequest {
        privileged: true,
        ..request(
            &[
                "setpriv",
                "--reuid=1000",
                "--regid=1000",
                "--clear-groups",
                "--",
                "id",
                "-u",
            ],
            false,
        )
    };
    let done = run(&f, &r, drop_to_user).await;
    assert_eq!(done.stdout, "1000\n", "{:?}", done.stderr);
    assert_eq!(done.exit, SpawnExit::Exited(0));
    f.destroy(&r).await;
}

/// How many processes named `sleep` the runner has.
async fn sleepers(f: &Fixture, r: &RunnerId) -> usize {
    let done = run(
        f,
        r,
        SpawnRequest {
            privileged: true,
            ..request(
                &["/bin/sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null"],
                false,
            )
        },
    )
    .await;
    done.stdout.lines().filter(|l| *l == "sleep").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_ends_the_whole_tree_and_so_does_dropping_the_control() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    for by_drop in [false, true] {
        let mut process = f
            .executor
            .spawn(
                &r,
                request(
                    &[
                        "/bin/sh",
                        "-c",
                        "sleep 1000 & (setsid sleep 1000 &); sleep 1000 & echo started; wait",
                    ],
                    false,
                ),
            )
            .await
            .unwrap();
        read_until(&mut process.stdout, "started").await;
        assert_eq!(sleepers(&f, &r).await, 3);
        if by_drop {
            drop(process);
        } else {
            process.control.kill();
            let exit = tokio::time::timeout(Duration::from_secs(30), process.control.wait())
                .await
                .unwrap();
            assert_eq!(exit, SpawnExit::Killed);
            assert_eq!(exit.code(), 137);
        }
        let mut left = usize::MAX;
        for _ in 0..100 {
            left = sleepers(&f, &r).await;
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left, 0, "processes survived the kill (by drop: {by_drop})");
    }
    f.destroy(&r).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destroyed_runner_ends_its_processes() {
    let f = Fixture::new().await;
    let r = f.runner().await;
    let process = f
        .executor
        .spawn(&r, request(&["sleep", "1000"], false))
        .await
        .unwrap();
    f.destroy(&r).await;
    let done = finish(process).await;
    assert!(
        matches!(done.exit, SpawnExit::RunnerGone(_)),
        "{:?}",
        done.exit
    );
    let gone = f
        .executor
        .spawn(&r, request(&["true"], false))
        .await
        .unwrap_err();
    assert!(matches!(gone, BackendError::RunnerNotFound(_)), "{gone:?}");
}
