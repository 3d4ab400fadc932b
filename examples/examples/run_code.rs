//! A client of the server's HTTP API: claim a runner, upload a file, run a command in it and
//! print the output stream as it arrives (stdin lines are forwarded), then give the runner back.
//!
//! `cargo run -p examples --example run_code -- <environment id> <file> <command>`
//!
//! The server is `POSEIDON_URL` (default `http://127.0.0.1:7200`), the token `POSEIDON_TOKEN`.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;

use anyhow::{Context, bail};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [environment, file, command] = args.as_slice() else {
        bail!("usage: run_code <environment id> <file> <command>");
    };
    let environment: u64 = environment
        .parse()
        .context("environment id must be a number")?;
    let base = std::env::var("POSEIDON_URL").unwrap_or_else(|_| "http://127.0.0.1:7200".into());
    let token = std::env::var("POSEIDON_TOKEN").unwrap_or_default();
    let api = format!("{}/api/v1", base.trim_end_matches('/'));
    let http = reqwest::Client::new();
    let authed = |request: reqwest::RequestBuilder| request.header("Poseidon-Token", &token);

    let claim: Value = authed(http.post(format!("{api}/runners")))
        .json(&json!({"executionEnvironmentId": environment, "inactivityTimeout": 60}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let runner = claim["runnerId"]
        .as_str()
        .context("no runnerId")?
        .to_owned();
    eprintln!("runner {runner}");

    let content = std::fs::read(file).with_context(|| format!("reading {file}"))?;
    let name = std::path::Path::new(file)
        .file_name()
        .and_then(|n| n.to_str())
        .context("file name")?;
    authed(http.patch(format!("{api}/runners/{runner}/files")))
        .json(&json!({"copy": [{"path": name, "content": base64::engine::general_purpose::STANDARD.encode(content)}]}))
        .send()
        .await?
        .error_for_status()?;

    let execute: Value = authed(http.post(format!("{api}/runners/{runner}/execute")))
        .json(&json!({"command": command, "timeLimit": 60}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let url = execute["websocketUrl"]
        .as_str()
        .context("no websocketUrl")?;
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("Poseidon-Token", token.parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    let (mut sink, mut stream) = socket.split();

    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if sink.send(Message::text(format!("{line}\n"))).await.is_err() {
                break;
            }
        }
    });

    let mut exit_code = 1;
    while let Some(message) = stream.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let event: Value = serde_json::from_str(&text)?;
        match event["type"].as_str() {
            Some("stdout") => {
                print!("{}", event["data"].as_str().unwrap_or_default());
                std::io::stdout().flush()?;
            }
            Some("stderr") => eprint!("{}", event["data"].as_str().unwrap_or_default()),
            Some("exit") => {
                exit_code = event["data"].as_i64().unwrap_or(1);
                eprintln!("\n[exit {exit_code}]");
            }
            Some("timeout") => eprintln!("\n[timeout]"),
            Some("error") => eprintln!("\n[error: {}]", event["data"]),
            _ => {}
        }
    }

    authed(http.delete(format!("{api}/runners/{runner}")))
        .send()
        .await?;
    std::process::exit(i32::try_from(exit_code).unwrap_or(1));
}
