//! A scripted Nomad for the adapter's own tests: a fake `NomadApi` that turns registrations into
//! the event sequences of nomad.md §3.1, and a small alloc-exec WebSocket server that runs the
//! commands as local processes (a terminal through util-linux `script`), with Nomad's frames.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use nomad_adapter::ApiError;
use nomad_adapter::api::{EventBody, JobStub, NomadApi, Registration};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Default)]
pub struct State {
    pub index: u64,
    pub jobs: HashMap<String, Value>,
    pub allocs: HashMap<String, Value>,
    pub buffer: Vec<(u64, String)>,
    pub subscribers: Vec<mpsc::UnboundedSender<Bytes>>,
    pub subscriptions: Vec<u64>,
    pub no_capacity: bool,
    pub registrations: usize,
    /// Evaluation results are not streamed (only readable with `GET /v1/evaluation/:id`).
    pub silent_evals: bool,
    pub eval_reads: usize,
}

#[derive(Debug, Default, Clone)]
pub struct Fake(Arc<Mutex<State>>);

impl State {
    fn batch(&mut self, mut events: Vec<Value>) {
        if self.silent_evals {
            events.retain(|e| e["Topic"] != "Evaluation");
            if events.is_empty() {
                return;
            }
        }
        self.index += 1;
        let index = self.index;
        let events: Vec<Value> = events
            .into_iter()
            .map(|mut e| {
                e["Index"] = json!(index);
                e
            })
            .collect();
        let line = json!({"Index": index, "Events": events}).to_string() + "\n";
        self.buffer.push((index, line.clone()));
        self.subscribers
            .retain(|s| s.send(Bytes::from(line.clone())).is_ok());
    }

    pub fn alloc_update(&mut self, id: &str, change: impl FnOnce(&mut Value)) {
        let index = self.index + 1;
        let Some(a) = self.allocs.get_mut(id) else {
            return;
        };
        change(a);
        a["ModifyIndex"] = json!(index);
        let a = a.clone();
        self.batch(vec![json!({"Topic": "Allocation", "Type": "AllocationUpdated", "Key": id, "Payload": {"Allocation": a}})]);
    }
}

impl Fake {
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    pub fn drop_streams(&self) {
        self.state().subscribers.clear();
    }
}

#[async_trait]
impl NomadApi for Fake {
    async fn register_job(&self, job: &Value) -> Result<Registration, ApiError> {
        let mut s = self.state();
        s.registrations += 1;
        let id = job["ID"].as_str().unwrap().to_string();
        let eval = format!("eval-{}", s.index + 1);
        let existed = s.jobs.insert(id.clone(), job.clone()).is_some();
        s.batch(vec![
            json!({"Topic": "Job", "Type": "JobRegistered", "Key": id, "Payload": {"Job": job}}),
            json!({"Topic": "Evaluation", "Type": "JobRegistered", "Key": eval, "Payload": {"Evaluation": {"ID": eval, "Status": "pending"}}}),
        ]);
        if existed || id.starts_with("template-") {
            s.batch(vec![json!({"Topic": "Evaluation", "Type": "EvaluationUpdated", "Key": eval, "Payload": {"Evaluation": {"ID": eval, "Status": "complete"}}})]);
            return Ok(Registration { eval_id: eval });
        }
        if s.no_capacity {
            s.batch(vec![json!({"Topic": "Evaluation", "Type": "EvaluationUpdated", "Key": eval, "Payload": {"Evaluation": {"ID": eval, "Status": "complete",
                "FailedTGAllocs": {"default-group": {"NodesEvaluated": 1, "NodesExhausted": 1, "DimensionExhausted": {"memory": 1}}}}}})]);
            return Ok(Registration { eval_id: eval });
        }
        let alloc_id = format!("alloc-{id}");
        let index = s.index + 1;
        let ports: Vec<Value> = job["TaskGroups"][0]["Networks"][0]["DynamicPorts"]
            .as_array()
            .map(|ports| {
                ports
                    .iter()
                    .enumerate()
                    .map(|(n, p)| json!({"Label": p["Label"], "Value": 20000 + index * 10 + n as u64, "To": p["To"], "HostIP": "127.0.0.1"}))
                    .collect()
            })
            .unwrap_or_default();
        let alloc = json!({"ID": alloc_id, "JobID": id, "ClientStatus": "pending", "DesiredStatus": "run",
            "CreateIndex": index, "ModifyIndex": index, "PreviousAllocation": "", "TaskStates": null,
            "AllocatedResources": {"Shared": {"Ports": ports}}});
        s.allocs.insert(alloc_id.clone(), alloc.clone());
        s.batch(vec![json!({"Topic": "Allocation", "Type": "PlanResult", "Key": alloc_id, "Payload": {"Allocation": alloc}})]);
        s.batch(vec![json!({"Topic": "Evaluation", "Type": "EvaluationUpdated", "Key": eval, "Payload": {"Evaluation": {"ID": eval, "Status": "complete"}}})]);
        // The client starts it a little later.
        let fake = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            fake.state()
                .alloc_update(&alloc_id, |a| a["ClientStatus"] = json!("running"));
        });
        Ok(Registration { eval_id: eval })
    }

    async fn read_job(&self, id: &str) -> Result<Option<Value>, ApiError> {
        Ok(self.state().jobs.get(id).cloned())
    }

    async fn list_jobs(&self, prefix: &str) -> Result<Vec<JobStub>, ApiError> {
        let s = self.state();
        let mut out: Vec<JobStub> = s
            .jobs
            .keys()
            .filter(|id| id.starts_with(prefix))
            .map(|id| JobStub {
                id: id.clone(),
                status: "running".into(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn purge_job(&self, id: &str) -> Result<(), ApiError> {
        let mut s = self.state();
        if let Some(job) = s.jobs.remove(id) {
            s.batch(vec![json!({"Topic": "Job", "Type": "JobDeregistered", "Key": id, "Payload": {"Job": job, "Deleted": true}})]);
            let alloc_id = format!("alloc-{id}");
            s.alloc_update(&alloc_id, |a| {
                a["ClientStatus"] = json!("complete");
                a["DesiredStatus"] = json!("stop");
            });
        }
        Ok(())
    }

    async fn job_allocations(&self, id: &str) -> Result<Vec<Value>, ApiError> {
        Ok(self
            .state()
            .allocs
            .values()
            .filter(|a| a["JobID"] == id)
            .cloned()
            .collect())
    }

    async fn read_evaluation(&self, id: &str) -> Result<Option<Value>, ApiError> {
        let mut s = self.state();
        s.eval_reads += 1;
        Ok(Some(
            json!({"ID": id, "Status": "complete", "FailedTGAllocs": null}),
        ))
    }

    async fn leader(&self) -> Result<String, ApiError> {
        Ok("127.0.0.1:4647".into())
    }

    async fn event_stream(&self, index: u64) -> Result<EventBody, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.state();
        s.subscriptions.push(index);
        let _ = tx.send(Bytes::from_static(b"{}\n"));
        for (i, line) in &s.buffer {
            if *i >= index {
                let _ = tx.send(Bytes::from(line.clone()));
            }
        }
        s.subscribers.push(tx);
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(Ok)
            .boxed())
    }
}

/// How the exec server ends sessions.
#[derive(Debug, Default)]
pub struct ExecFaults {
    /// Sessions still to be closed with a normal close frame instead of `exited`.
    pub close_before_exit: AtomicUsize,
    /// Exit code reported instead of the real one for the next sessions (e.g. 128 after an OOM).
    pub forced_exit: Mutex<Option<i32>>,
}

/// Starts the exec server; returns its `http://` address.
pub async fn exec_server(faults: Arc<ExecFaults>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(session(tcp, faults.clone()));
        }
    });
    format!("http://{addr}")
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[allow(clippy::result_large_err)]
async fn session(tcp: tokio::net::TcpStream, faults: Arc<ExecFaults>) {
    let uri = Arc::new(Mutex::new(String::new()));
    let seen = uri.clone();
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(
        tcp,
        move |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
            *seen.lock().unwrap() = req.uri().to_string();
            Ok(resp)
        },
    )
    .await
    else {
        return;
    };
    let uri = uri.lock().unwrap().clone();
    let query = uri.split_once('?').map(|(_, q)| q).unwrap_or("");
    let params: HashMap<String, String> = url_decode(query);
    let argv: Vec<String> =
        serde_json::from_str(params.get("command").map_or("[]", String::as_str))
            .unwrap_or_default();
    let tty = params.get("tty").map(String::as_str) == Some("true");
    let (mut sink, mut stream) = ws.split();
    if argv.is_empty() {
        let _ = sink.send(Message::Close(None)).await;
        return;
    }
    let mut command = if tty {
        let line = argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ");
        let mut c = tokio::process::Command::new("script");
        c.args(["-qfec", &line, "/dev/null"]);
        c
    } else {
        let mut c = tokio::process::Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    };
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let Ok(mut child) = command.spawn() else {
        let _ = sink.send(Message::Close(None)).await;
        return;
    };
    let pgid = child.id().unwrap_or(0);
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (out_tx, mut out_rx) = mpsc::channel::<String>(64);
    let pipe = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                name: &'static str,
                tx: mpsc::Sender<String>| async move {
        let mut buf = vec![0u8; 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = json!({ name: {"data": B64.encode(&buf[..n])} }).to_string();
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let readers = tokio::spawn({
        let a = pipe(Box::new(stdout), "stdout", out_tx.clone());
        let b = pipe(Box::new(stderr), "stderr", out_tx);
        async move {
            tokio::join!(a, b);
        }
    });
    let mut exited = None;
    loop {
        tokio::select! {
            frame = out_rx.recv() => match frame {
                Some(f) => { if sink.send(Message::text(f)).await.is_err() { break; } }
                None => {
                    if exited.is_none() {
                        exited = child.wait().await.ok().and_then(|s| s.code().or_else(|| std::os::unix::process::ExitStatusExt::signal(&s).map(|s| 128 + s)));
                    }
                    break;
                }
            },
            input = stream.next() => match input {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if let Some(data) = v["stdin"]["data"].as_str()
                        && let (Some(s), Ok(bytes)) = (stdin.as_mut(), B64.decode(data))
                    {
                        let _ = s.write_all(&bytes).await;
                    }
                    if v["stdin"]["close"] == Value::Bool(true) {
                        stdin = None;
                    }
                }
                Some(Ok(_)) => {}
                other => {
                    eprintln!("fake exec: client went away: {other:?}");
                    // The client went away: kill the process group.
                    let _ = std::process::Command::new("kill").args(["-9", "--", &format!("-{pgid}")]).status();
                    readers.abort();
                    return;
                }
            },
        }
    }
    let code = faults
        .forced_exit
        .lock()
        .unwrap()
        .unwrap_or(exited.unwrap_or(0));
    let _ = sink
        .send(Message::text(r#"{"stdout":{"close":true}}"#))
        .await;
    let _ = sink
        .send(Message::text(r#"{"stderr":{"close":true}}"#))
        .await;
    if faults
        .close_before_exit
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let _ = sink.send(Message::Close(None)).await;
        return;
    }
    let result = if code == 0 {
        json!({})
    } else {
        json!({"exit_code": code})
    };
    let _ = sink
        .send(Message::text(
            json!({"exited": true, "result": result}).to_string(),
        ))
        .await;
    // Read what the client still sends before dropping the connection (no close frame, as
    // Nomad): closing with unread data would reset it and lose the frames just sent.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

fn url_decode(query: &str) -> HashMap<String, String> {
    reqwest::Url::parse(&format!("http://x/?{query}"))
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Logs of the adapter in test output (`RUST_LOG`, default warn).
pub mod sandboxes;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
