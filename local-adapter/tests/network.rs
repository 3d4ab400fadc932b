//! Runner networking through the local backend: exposed ports reachable at the returned host
//! address, network access only when asked for, everything released with the runner.

mod common;

use std::time::Duration;

use common::*;
use runner_core::ExecutorApi;

fn with_network(access: bool, ports: Vec<u16>) -> runner_core::EnvironmentSpec {
    let mut spec = spec(256);
    spec.network_access = access;
    spec.exposed_ports = ports;
    spec
}

async fn fetch(address: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream
        .write_all(b"GET /hello.txt HTTP/1.0\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposed_ports_of_two_runners_are_reachable_at_their_host_addresses() {
    let fixture = Fixture::with(|c| c.network = Some(Default::default())).await;
    let spec = with_network(false, vec![8080]);
    let mut runners = Vec::new();
    for name in ["first", "second"] {
        let info = fixture
            .executor
            .create_runner(&spec)
            .await
            .expect("create")
            .into_info();
        assert_eq!(info.mapped_ports.len(), 1);
        assert_eq!(info.mapped_ports[0].exposed_port, 8080);
        let serve = format!(
            "echo {name} > hello.txt && (python3 -m http.server 8080 >/dev/null 2>&1 &) && sleep 0.5"
        );
        let outcome = run(&fixture.executor, &info.id, &serve).await;
        assert_eq!(outcome.code(), Some(0), "{}", outcome.err());
        runners.push((name, info));
    }
    for (name, info) in &runners {
        let address = &info.mapped_ports[0].host_address;
        let mut body = None;
        for _ in 0..50 {
            body = fetch(address).await;
            if body.as_deref().is_some_and(|b| b.contains(name)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            body.as_deref().is_some_and(|b| b.contains(name)),
            "{address} served {body:?}"
        );
    }
    for (_, info) in &runners {
        fixture.destroy(&info.id).await;
        let address = &info.mapped_ports[0].host_address;
        // A freed listener may linger for a moment in a child being forked (until its exec).
        let mut closed = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(address).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(closed, "{address} still open after destroy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_runners_with_network_access_get_an_interface_beyond_loopback() {
    let fixture = Fixture::with(|c| c.network = Some(Default::default())).await;
    let closed = fixture.runner_with(with_network(false, vec![])).await;
    let open = fixture.runner_with(with_network(true, vec![])).await;
    let links = "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' '";
    assert_eq!(
        run(&fixture.executor, &closed, links).await.out().trim(),
        "lo"
    );
    let with = run(&fixture.executor, &open, links).await.out();
    assert!(with.split_whitespace().count() >= 2, "links: {with}");
    let route = run(&fixture.executor, &open, "cat /proc/net/route | wc -l").await;
    assert!(
        route.out().trim().parse::<u32>().unwrap_or(0) >= 2,
        "a default route exists"
    );
    fixture.destroy(&closed).await;
    fixture.destroy(&open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_without_networking_refuses_environments_that_need_it() {
    let fixture = Fixture::new().await;
    let err = fixture
        .executor
        .create_runner(&with_network(true, vec![80]))
        .await
        .expect_err("no networking configured");
    assert!(err.to_string().contains("networking"), "{err}");
    let plain = fixture.runner().await;
    fixture.destroy(&plain).await;
}
