// The end-to-end test bodies both backends run: included by e2e_local.rs and e2e_nomad.rs, each
// of which declares `mod common`, the imports and `BACKEND`.

/// Environments a test may create; all are deleted when the test ends.
const ENVIRONMENTS: [u64; 2] = [0, 42];

/// The backend a suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
enum Backend {
    /// The embedded backend: sandboxes of the server process.
    Local,
    /// Nomad: the server's Nomad adapter against a `nomad-emulator` started by the test, whose
    /// allocations run as local sandboxes.
    Nomad,
}

struct E2e {
    /// Declared before `server` so that the server stops first (its drop deletes the
    /// environments, whose jobs the cluster then stops).
    server: ServerProcess,
    cluster: Option<common::nomad::Cluster>,
    vars: Vec<(String, String)>,
    base: String,
    client: reqwest::Client,
}

fn borrowed(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

impl E2e {
    /// A server with environment 0 (pool `pool`, 100 MB, no network) ready.
    async fn start(pool: u32) -> Self {
        let cluster = match BACKEND {
            Backend::Local => None,
            Backend::Nomad => Some(common::nomad::Cluster::start().await),
        };
        let mut vars = vec![("POSEIDON_SERVER_TOKEN".to_string(), TOKEN.to_string())];
        if let Some(cluster) = &cluster {
            vars.extend(cluster.server_vars());
        }
        let mut with_secret = vars.clone();
        with_secret.push(("POSEIDON_E2E_HOST_SECRET".into(), "must-not-leak".into()));
        let server = spawn(&borrowed(&with_secret));
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("Poseidon-Token", TOKEN.parse().expect("header"));
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("client");
        let e2e = Self {
            base: format!("http://{}/api/v1", server.addr),
            server,
            cluster,
            vars,
            client,
        };
        if pool > 0 {
            let r = e2e.put_environment(0, pool, 100).await;
            assert_eq!(r, 201);
            e2e.wait_idle(0, pool).await;
        }
        e2e
    }

    /// Stops the server with SIGTERM and starts it again on the same data directory.
    fn restart(&mut self) {
        self.server.signal("TERM");
        assert_eq!(self.server.wait_exit(Duration::from_secs(30)), Some(0));
        let dir = std::mem::replace(&mut self.server.dir, tempfile::tempdir().expect("dir"));
        self.server = common::process::spawn_in(dir, &borrowed(&self.vars));
        self.base = format!("http://{}/api/v1", self.server.addr);
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn put_environment(&self, id: u64, pool: u32, memory: u32) -> u16 {
        self.client
            .put(self.url(&format!("/execution-environments/{id}")))
            .json(
                &json!({"id": id, "image": "host", "prewarmingPoolSize": pool, "cpuLimit": 20,
                "memoryLimit": memory, "networkAccess": false, "exposedPorts": []}),
            )
            .send()
            .await
            .expect("put")
            .status()
            .as_u16()
    }

    async fn wait_idle(&self, id: u64, idle: u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let stats: Value = self
                .client
                .get(self.url("/statistics/execution-environments"))
                .send()
                .await
                .expect("stats")
                .json()
                .await
                .expect("json");
            if stats[id.to_string()]["idleRunners"].as_u64() >= Some(u64::from(idle)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("environment {id} never had {idle} idle runners");
    }

    async fn claim(&self, timeout: u64) -> String {
        let r = self
            .client
            .post(self.url("/runners"))
            .json(&json!({"executionEnvironmentId": 0, "inactivityTimeout": timeout}))
            .send()
            .await
            .expect("claim");
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("json");
        body["runnerId"].as_str().expect("runnerId").to_string()
    }

    async fn copy(&self, runner: &str, body: Value) -> reqwest::Response {
        self.client
            .patch(self.url(&format!("/runners/{runner}/files")))
            .json(&body)
            .send()
            .await
            .expect("patch")
    }

    async fn websocket_url(&self, runner: &str, body: Value) -> String {
        let r = self
            .client
            .post(self.url(&format!("/runners/{runner}/execute")))
            .json(&body)
            .send()
            .await
            .expect("execute");
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.expect("json");
        body["websocketUrl"].as_str().expect("url").to_string()
    }

    async fn run(&self, runner: &str, body: Value) -> Transcript {
        let url = self.websocket_url(runner, body).await;
        let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
        read_all(&mut ws, Duration::from_secs(60)).await
    }

    async fn sh(&self, runner: &str, command: &str) -> Transcript {
        self.run(runner, json!({"command": command})).await
    }
}

/// Deletes the test's environments (destroying their runners) over a plain socket, then stops the
/// server: also on a failed test.
impl Drop for E2e {
    fn drop(&mut self) {
        for id in ENVIRONMENTS {
            if let Ok(mut stream) = std::net::TcpStream::connect(&self.server.addr) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let request = format!(
                    "DELETE /api/v1/execution-environments/{id} HTTP/1.1\r\nHost: {}\r\nPoseidon-Token: {TOKEN}\r\nConnection: close\r\n\r\n",
                    self.server.addr
                );
                if stream.write_all(request.as_bytes()).is_ok() {
                    let mut answer = Vec::new();
                    let _ = stream.read_to_end(&mut answer);
                }
            }
        }
        self.server.signal("TERM");
        let _ = self.server.wait_exit(Duration::from_secs(30));
        if let Some(cluster) = self.cluster.take() {
            cluster.stop_blocking();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_route_is_204() {
    let e = E2e::start(0).await;
    let r = reqwest::get(e.url("/health")).await.expect("health");
    assert_eq!(r.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_update_and_delete_an_environment() {
    let e = E2e::start(0).await;
    let r = e
        .client
        .put(e.url("/execution-environments/42"))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 400, "empty body");
    let r = e
        .client
        .put(e.url("/execution-environments/42"))
        .json(
            &json!({"image": "host", "prewarmingPoolSize": 1, "cpuLimit": 20, "memoryLimit": 100,
            "networkAccess": false, "exposedPorts": []}),
        )
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["content-length"], "0");
    assert_eq!(e.put_environment(42, 1, 200).await, 204);
    let env: Value = e
        .client
        .get(e.url("/execution-environments/42"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    for key in [
        "id",
        "prewarmingPoolSize",
        "cpuLimit",
        "memoryLimit",
        "image",
        "networkAccess",
        "exposedPorts",
    ] {
        assert!(env.get(key).is_some(), "{key} missing in {env}");
    }
    assert_eq!(env["memoryLimit"], 200);
    let list: Value = e
        .client
        .get(e.url("/execution-environments"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list["executionEnvironments"][0]["id"], 42);
    let r = e
        .client
        .delete(e.url("/execution-environments/42"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let r = e
        .client
        .get(e.url("/execution-environments/42"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provide_runner_answers_200_400_and_404() {
    let e = E2e::start(1).await;
    assert!(!e.claim(60).await.is_empty());
    let r = e
        .client
        .post(e.url("/runners"))
        .send()
        .await
        .expect("claim");
    assert_eq!(r.status(), 400);
    let r = e
        .client
        .post(e.url("/runners"))
        .json(&json!({"executionEnvironmentId": 9999}))
        .send()
        .await
        .expect("claim");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_runner_twice_answers_410() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let url = e.url(&format!("/runners/{runner}"));
    assert_eq!(
        e.client.delete(&url).send().await.expect("delete").status(),
        204
    );
    assert_eq!(
        e.client.delete(&url).send().await.expect("delete").status(),
        410
    );
    let r = e
        .client
        .delete(e.url("/runners/0-unknown"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 410);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_the_file_system() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let files = e.url(&format!("/runners/{runner}/files"));
    let listing: Value = e
        .client
        .get(&files)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(listing, json!({"files": []}));
    assert_eq!(
        e.copy(
            &runner,
            json!({"copy": [{"path": "test.txt", "content": ""}]})
        )
        .await
        .status(),
        204
    );
    let listing: Value = e
        .client
        .get(&files)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let entries = listing["files"].as_array().expect("files");
    assert_eq!(entries.len(), 1, "{listing}");
    assert_eq!(entries[0]["name"], "./test.txt");
    assert_eq!(entries[0]["entryType"], "-");
    assert_eq!(entries[0]["owner"], "root");
    assert_eq!(entries[0]["group"], "root");
    assert_eq!(entries[0]["permissions"], "rwxr--r--");
    // The local backend's file helper is a fork of this server: its own /proc describes a host
    // process and is never served (issue 9 item 5). On Nomad the helper is a process of the
    // container itself, so there is nothing to hide.
    if BACKEND == Backend::Nomad {
        return;
    }
    let own = e
        .client
        .get(format!("{files}?path=/proc/self/cwd&recursive=false"))
        .send()
        .await
        .expect("list");
    assert_eq!(own.status(), 424);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copying_files_relative_absolute_and_deleting() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let r = e
        .copy(
            &runner,
            json!({"copy": [
            {"path": "test.txt", "content": "VGVzdEZpbGVDb250ZW50"},
            {"path": "relative/file/path.txt", "content": "cmVsYXRpdmU="},
            {"path": "/tmp/absolute/file/path.txt", "content": "YWJzb2x1dGU="}]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        e.sh(&runner, "cat test.txt").await.stdout(),
        "TestFileContent"
    );
    assert_eq!(
        e.sh(&runner, "cat relative/file/path.txt").await.stdout(),
        "relative"
    );
    assert_eq!(
        e.sh(&runner, "cat /tmp/absolute/file/path.txt")
            .await
            .stdout(),
        "absolute"
    );
    assert_eq!(
        e.copy(&runner, json!({"delete": ["test.txt"]}))
            .await
            .status(),
        204
    );
    let t = e.sh(&runner, "cat test.txt").await;
    assert!(t.stderr().contains("No such file or directory"), "{t:?}");
    let r = e
        .copy(
            &runner,
            json!({"delete": ["test.txt"], "copy": [{"path": "test.txt", "content": "YWdhaW4="}]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(e.sh(&runner, "cat test.txt").await.stdout(), "again");
    let r = e
        .client
        .patch(e.url(&format!("/runners/{runner}/files")))
        .header("content-type", "text/html")
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 400);
    assert_eq!(
        e.copy("0-unknown", json!({"delete": []})).await.status(),
        410
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copying_a_forbidden_path_is_500_unknown_and_the_rest_is_written() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let r = e
        .copy(
            &runner,
            json!({"copy": [
            {"path": "/proc/1/environ", "content": "Zm9v"},
            {"path": "test.txt", "content": "Zm9v"}]}),
        )
        .await;
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["errorCode"], "UNKNOWN");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Cannot open: "),
        "{body}"
    );
    assert_eq!(e.sh(&runner, "cat test.txt").await.stdout(), "foo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_folders_keep_their_content_from_the_user() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let r = e
        .copy(
            &runner,
            json!({"copy": [
            {"path": "protectedFolder/"},
            {"path": "protectedFolder/test.txt", "content": "SGVsbG8="}]}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let t = e.sh(&runner, "touch protectedFolder/userfile").await;
    assert_eq!(t.stdout() + &t.stderr(), "");
    let t = e.sh(&runner, "rm -fr protectedFolder/").await;
    assert!(t.stderr().contains("Operation not permitted"), "{t:?}");
    let t = e.sh(&runner, "rm -f protectedFolder/test.txt").await;
    assert!(t.stderr().contains("Operation not permitted"), "{t:?}");
    let t = e.sh(&runner, "echo Hi >> protectedFolder/test.txt").await;
    assert!(t.stderr().contains("Permission denied"), "{t:?}");
    assert_eq!(
        e.sh(&runner, "cat protectedFolder/test.txt").await.stdout(),
        "Hello"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloading_file_content() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let raw = e.url(&format!("/runners/{runner}/files/raw"));
    let r = e
        .client
        .get(format!("{raw}?path=test.txt"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 424);
    assert_eq!(
        e.copy(
            &runner,
            json!({"copy": [{"path": "test.txt", "content": "VGVzdEZpbGVDb250ZW50"}]})
        )
        .await
        .status(),
        204
    );
    let r = e
        .client
        .get(format!("{raw}?path=test.txt"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "15");
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"test.txt\""
    );
    assert_eq!(r.bytes().await.expect("body").as_ref(), b"TestFileContent");
    let r = e
        .client
        .get(format!("{raw}?path=/proc/1/environ"))
        .send()
        .await
        .expect("raw");
    assert_eq!(r.status(), 424);
    assert!(
        r.text()
            .await
            .expect("text")
            .contains("file not found or insufficient permissions")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactivity_timeout_ends_sleep_infinity_with_timeout() {
    let e = E2e::start(1).await;
    let runner = e.claim(2).await;
    let started = Instant::now();
    let t = e.sh(&runner, "sleep infinity").await;
    assert_eq!(t.last(), json!({"type": "timeout"}));
    assert_eq!(t.close_code, Some(1000));
    assert!(started.elapsed() < Duration::from_secs(30));
    let r = e
        .client
        .delete(e.url(&format!("/runners/{runner}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 410);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executing_true_sends_start_exit_and_close() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let t = e.sh(&runner, "true").await;
    assert_eq!(
        t.messages,
        vec![json!({"type": "start"}), json!({"type": "exit", "data": 0})]
    );
    assert_eq!(t.close_code, Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_stdout_and_stderr_stays_apart() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let t = e.sh(&runner, "echo -n Hello World").await;
    assert_eq!(t.stdout(), "Hello World");
    assert_eq!(
        t.control(),
        vec![json!({"type": "start"}), json!({"type": "exit", "data": 0})]
    );
    let t = e.sh(&runner, "cat -invalid").await;
    assert!(t.stderr().contains("cat: invalid option"), "{t:?}");
    assert!(!t.stdout().contains("invalid option"), "{t:?}");
    assert_eq!(t.last(), json!({"type": "exit", "data": 1}));
    let t = e.sh(&runner, "exit 42").await;
    assert_eq!(t.last(), json!({"type": "exit", "data": 42}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprivileged_and_privileged_users() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let t = e.sh(&runner, "id --name --user").await;
    assert!(!t.stdout().contains("root"), "{t:?}");
    let t = e
        .run(
            &runner,
            json!({"command": "id --name --user", "privilegedExecution": true}),
        )
        .await;
    assert!(t.stdout().contains("root"), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_echoed_by_the_terminal_and_read_by_head() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let url = e
        .websocket_url(&runner, json!({"command": "head -n 1"}))
        .await;
    let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
    common::send_text(&mut ws, "Hello World!\n").await;
    let t = read_all(&mut ws, Duration::from_secs(30)).await;
    let out = t.stdout();
    assert_eq!(
        out.matches("Hello World!").count(),
        2,
        "echo and output: {out:?}"
    );
    assert!(out.contains("Hello World!\r\n"), "{out:?}");
    assert_eq!(t.last(), json!({"type": "exit", "data": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_runs_a_makefile() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let makefile = "run:\n\t@echo MeinText\n";
    let content = base64_encode(makefile.as_bytes());
    assert_eq!(
        e.copy(
            &runner,
            json!({"copy": [{"path": "Makefile", "content": content}]})
        )
        .await
        .status(),
        204
    );
    let t = e.sh(&runner, "make run").await;
    assert_eq!(
        t.stdout().trim_end_matches(['\r', '\n']),
        "MeinText",
        "{t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_are_passed_exactly_and_nothing_from_the_host() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let t = e
        .run(
            &runner,
            json!({"command": "env", "environment": {
            "hello": "world", "SPACED": "a b  c", "QUOTED": "it's \"quoted\" $HOME"}}),
        )
        .await;
    let out = t.stdout();
    assert!(out.contains("hello=world"), "{out}");
    assert!(out.contains("SPACED=a b  c"), "{out}");
    assert!(out.contains("QUOTED=it's \"quoted\" $HOME"), "{out}");
    assert!(out.contains("CODEOCEAN=true"), "{out}");
    assert!(!out.contains("must-not-leak"), "{out}");
    assert!(!out.contains("NOMAD_") && !out.contains("AWS"), "{out}");
    assert!(!out.contains("POSEIDON_"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_limit_ends_the_execution_with_timeout() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let started = Instant::now();
    let t = e
        .run(&runner, json!({"command": "sleep 30", "timeLimit": 1}))
        .await;
    assert_eq!(t.last(), json!({"type": "timeout"}));
    assert_eq!(t.close_code, Some(1000));
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_quotes_in_commands_work() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let t = e.sh(&runner, "echo 'single quoted' \"it's\"").await;
    assert_eq!(t.stdout(), "single quoted it's\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_memory_limit_kills_the_process_not_the_runner() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let t = e
        .sh(&runner, "</dev/zero head -c 110MB | tail > /dev/null")
        .await;
    assert_eq!(t.stdout(), "");
    assert!(t.stderr().contains("Killed"), "{t:?}");
    assert!(matches!(t.last()["type"].as_str(), Some("exit")), "{t:?}");
    assert_eq!(e.sh(&runner, "echo alive").await.stdout(), "alive\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_needs_the_token() {
    let e = E2e::start(1).await;
    let runner = e.claim(60).await;
    let url = e.websocket_url(&runner, json!({"command": "true"})).await;
    let err = connect(&url, None).await.expect_err("unauthenticated");
    assert!(err.to_string().contains("401"), "{err}");
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_and_their_files_survive_a_restart() {
    let mut e = E2e::start(2).await;
    let runner = e.claim(600).await;
    assert_eq!(
        e.copy(
            &runner,
            json!({"copy": [{"path": "kept.txt", "content": "a2VwdA=="}]})
        )
        .await
        .status(),
        204
    );
    e.restart();
    e.wait_idle(0, 2).await;
    let stats: Value = e
        .client
        .get(e.url("/statistics/execution-environments"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(
        stats["0"],
        json!({"id": 0, "prewarmingPoolSize": 2, "idleRunners": 2, "usedRunners": 1})
    );
    assert_eq!(e.sh(&runner, "cat kept.txt").await.stdout(), "kept");
    let other = e.claim(600).await;
    assert_ne!(other, runner, "a used runner is never handed out twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_executions_each_get_their_own_output() {
    let e = E2e::start(4).await;
    let mut runners = Vec::new();
    for _ in 0..4 {
        runners.push(e.claim(600).await);
    }
    let mut urls = Vec::new();
    for i in 0..200 {
        let runner = &runners[i % runners.len()];
        urls.push((
            i,
            e.websocket_url(runner, json!({"command": format!("echo n{i}")}))
                .await,
        ));
    }
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|(i, url)| {
            tokio::spawn(async move {
                let mut ws = connect(&url, Some(TOKEN)).await.expect("connect");
                (i, read_all(&mut ws, Duration::from_secs(120)).await)
            })
        })
        .collect();
    for task in tasks {
        let (i, t) = task.await.expect("task");
        assert_eq!(t.stdout(), format!("n{i}\r\n"), "{t:?}");
        assert_eq!(t.last(), json!({"type": "exit", "data": 0}));
        assert_eq!(t.close_code, Some(1000));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposed_ports_are_returned_as_mapped_ports_and_reachable() {
    let e2e = E2e::start(0).await;
    let r = e2e
        .client
        .put(e2e.url("/execution-environments/42"))
        .json(
            // On Nomad, as in Poseidon, ports are placed only for environments with network
            // access (a group without a network has none); the local backend maps them always.
            &json!({"id": 42, "image": "host", "prewarmingPoolSize": 1, "cpuLimit": 20,
            "memoryLimit": 100, "networkAccess": BACKEND == Backend::Nomad, "exposedPorts": [8080]}),
        )
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    e2e.wait_idle(42, 1).await;
    let claim: Value = e2e
        .client
        .post(e2e.url("/runners"))
        .json(&json!({"executionEnvironmentId": 42, "inactivityTimeout": 60}))
        .send()
        .await
        .expect("claim")
        .json()
        .await
        .expect("json");
    let runner = claim["runnerId"].as_str().expect("runnerId");
    let mapped = claim["mappedPorts"].as_array().expect("mappedPorts");
    assert_eq!(mapped.len(), 1, "{claim}");
    assert_eq!(mapped[0]["exposedPort"], 8080);
    let address = mapped[0]["hostAddress"]
        .as_str()
        .expect("hostAddress")
        .to_string();
    let serve = e2e
        .sh(
            runner,
            "echo served-from-runner > page.txt && (python3 -m http.server 8080 >/dev/null 2>&1 &) && sleep 0.5",
        )
        .await;
    assert_eq!(
        serve.last(),
        json!({"type": "exit", "data": 0}),
        "{serve:?}"
    );
    let mut body = String::new();
    for _ in 0..50 {
        if let Ok(mut stream) = std::net::TcpStream::connect(&address) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = stream.write_all(b"GET /page.txt HTTP/1.0\r\n\r\n");
            body.clear();
            let _ = stream.read_to_string(&mut body);
            if body.contains("served-from-runner") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(body.contains("served-from-runner"), "{address}: {body:?}");
    let deleted = e2e
        .client
        .delete(e2e.url(&format!("/runners/{runner}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);
    // A freed listener may linger for a moment in a child the server is forking (until its
    // exec), so the port must be refused within a few seconds, not at the first try.
    let released = (0..100).any(|_| {
        let refused = std::net::TcpStream::connect(&address).is_err();
        if !refused {
            std::thread::sleep(Duration::from_millis(50));
        }
        refused
    });
    assert!(released, "the host port is released with the runner");
}
