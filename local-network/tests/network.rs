//! Runner networking against the real kernel: bridge, veths, nftables rules and port forwarding.
//! Needs root. Test namespaces (`ip netns add`) stand in for runners' namespaces.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{
    InstanceGuard, Outside, TestNs, config, fetch_hello, http_get, links_with_prefix, serve_in,
    table_exists, unique,
};
use local_network::{HostNetwork, NetworkConfig, NetworkError, RunnerNetwork};
use runner_core::RunnerId;

fn runner(name: &str) -> RunnerId {
    RunnerId::new(format!("7-{name}-{}", std::process::id()))
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Host port of the first mapped port.
fn host_port(network: &RunnerNetwork) -> u16 {
    let (_, port) = network.mapped_ports[0]
        .host_address
        .rsplit_once(':')
        .expect("host:port");
    port.parse().expect("port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_with_access_reaches_outside_and_bridge_but_not_host_blocked_or_other_runners() {
    common::init_tracing();
    let (tag, octet) = unique();
    let _guard = InstanceGuard(tag.clone());
    let outside = Outside::new(&tag, octet);
    let gateway: Ipv4Addr = format!("10.213.{octet}.1").parse().expect("address");
    // A host service offered to runners: must be bound after the bridge exists.
    let offered = 3000 + u16::from(octet);
    let network = HostNetwork::start(config(octet, vec![offered]), &tag, &[])
        .await
        .expect("start");

    let r1 = TestNs::new(format!("{tag}-r1"));
    let r2 = TestNs::new(format!("{tag}-r2"));
    let n1 = network
        .attach(&runner("a"), &r1.path(), true, &[], None)
        .await
        .expect("attach r1");
    let n2 = network
        .attach(&runner("b"), &r2.path(), true, &[], None)
        .await
        .expect("attach r2");
    let (a1, a2) = (n1.address.expect("address"), n2.address.expect("address"));
    assert_ne!(a1, a2);
    assert!(r1.links().contains(&"eth0".to_owned()));

    let outside_service = outside.ns.serve(addr(outside.public, 0));
    let blocked_service = outside.ns.serve(addr(outside.link_local, 0));
    let offered_service = serve_in(None, addr(gateway, offered));
    let other_gateway_service = serve_in(None, addr(gateway, 0));
    let host_other_address_service = serve_in(None, addr(outside.host_address, 0));
    let other_runner_service = r2.serve(addr(a2, 0));

    // Controls: every listener works for someone, so a refusal below is the rules' doing.
    assert!(outside.ns.can_connect(host_other_address_service));
    assert!(fetch_hello(&blocked_service.to_string()).is_some());
    assert!(fetch_hello(&other_runner_service.to_string()).is_some());
    assert!(fetch_hello(&other_gateway_service.to_string()).is_some());

    assert!(r1.can_connect(outside_service), "outside via the host");
    assert!(
        r1.can_connect(offered_service),
        "offered port on the bridge address"
    );
    assert!(!r1.can_connect(blocked_service), "blocked range");
    assert!(
        !r1.can_connect(other_gateway_service),
        "other port on the bridge address"
    );
    assert!(
        !r1.can_connect(host_other_address_service),
        "host's other address"
    );
    assert!(!r1.can_connect(other_runner_service), "another runner");

    network.teardown().await;
    assert!(links_with_prefix(&format!("pv{tag}-")).is_empty());
    assert!(!table_exists(&tag));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_without_access_has_loopback_only_and_reaches_nothing() {
    common::init_tracing();
    let (tag, octet) = unique();
    let _guard = InstanceGuard(tag.clone());
    let outside = Outside::new(&tag, octet);
    let gateway: Ipv4Addr = format!("10.213.{octet}.1").parse().expect("address");
    let offered = 3000 + u16::from(octet);
    let network = HostNetwork::start(config(octet, vec![offered]), &tag, &[])
        .await
        .expect("start");
    let r = TestNs::new(format!("{tag}-r"));
    let n = network
        .attach(&runner("c"), &r.path(), false, &[], None)
        .await
        .expect("attach");
    assert_eq!(n.address, None);
    assert_eq!(r.links(), vec!["lo".to_owned()], "no veth without access");
    assert!(links_with_prefix(&format!("pv{tag}-")).is_empty());

    let outside_service = outside.ns.serve(addr(outside.public, 0));
    let offered_service = serve_in(None, addr(gateway, offered));
    let blocked_service = outside.ns.serve(addr(outside.link_local, 0));
    assert!(fetch_hello(&outside_service.to_string()).is_some());
    assert!(fetch_hello(&offered_service.to_string()).is_some());
    assert!(!r.can_connect(outside_service));
    assert!(!r.can_connect(offered_service));
    assert!(!r.can_connect(blocked_service));
    network.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_exposing_the_same_port_serve_their_own_pages() {
    common::init_tracing();
    let (tag, octet) = unique();
    let _guard = InstanceGuard(tag.clone());
    let network = HostNetwork::start(config(octet, vec![]), &tag, &[])
        .await
        .expect("start");
    let dir = std::env::temp_dir().join(format!("local-network-{tag}"));
    let mut runners = Vec::new();
    for (i, access) in [false, true].into_iter().enumerate() {
        let site = dir.join(i.to_string());
        std::fs::create_dir_all(&site).expect("site dir");
        std::fs::write(site.join("who.txt"), format!("runner-{i}")).expect("page");
        let mut ns = TestNs::new(format!("{tag}-h{i}"));
        ns.spawn(&[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
            "--directory",
            site.to_str().expect("utf-8"),
        ]);
        let id = runner(&format!("web{i}"));
        let n = network
            .attach(&id, &ns.path(), access, &[8080], None)
            .await
            .expect("attach");
        assert_eq!(n.mapped_ports.len(), 1);
        assert_eq!(n.mapped_ports[0].exposed_port, 8080);
        assert!(n.mapped_ports[0].host_address.starts_with("127.0.0.1:"));
        runners.push((ns, id, n));
    }
    assert_ne!(
        runners[0].2.mapped_ports[0].host_address,
        runners[1].2.mapped_ports[0].host_address
    );
    for (i, (_, _, n)) in runners.iter().enumerate() {
        let address = n.mapped_ports[0].host_address.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        let page = loop {
            let target = address.clone();
            let response = tokio::task::spawn_blocking(move || http_get(&target, "/who.txt"))
                .await
                .expect("fetch task");
            match response {
                Some(text) if text.starts_with("HTTP/1.0 200") => break text,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("no page from runner {i} at {address}: {other:?}"),
            }
        };
        assert!(page.ends_with(&format!("runner-{i}")), "{page}");
    }
    for (_, id, n) in &runners {
        network.detach(id).await;
        let address = n.mapped_ports[0].host_address.clone();
        assert!(common::stops_listening(&address), "{address} still listens");
    }
    network.teardown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_frees_host_ports_and_address_for_a_new_attach() {
    common::init_tracing();
    let (tag, octet) = unique();
    let _guard = InstanceGuard(tag.clone());
    let network = HostNetwork::start(config(octet, vec![]), &tag, &[])
        .await
        .expect("start");
    let ns = TestNs::new(format!("{tag}-p"));
    let first = network
        .attach(&runner("p1"), &ns.path(), true, &[8080, 9090, 8080], None)
        .await
        .expect("attach");
    assert_eq!(first.mapped_ports.len(), 2, "duplicates are mapped once");
    let taken = network
        .attach(&runner("p2"), &ns.path(), false, &[8080], Some(&first))
        .await
        .expect("attach while the ports are taken");
    assert_ne!(
        taken.mapped_ports[0].host_address, first.mapped_ports[0].host_address,
        "a taken host port is not handed out twice"
    );
    network.detach(&runner("p2")).await;
    network.detach(&runner("p1")).await;
    network.detach(&runner("p1")).await; // idempotent
    assert!(
        ns.links().iter().all(|l| l == "lo"),
        "veth gone with detach"
    );

    let ns2 = TestNs::new(format!("{tag}-q"));
    let second = network
        .attach(&runner("q"), &ns2.path(), true, &[8080, 9090], Some(&first))
        .await
        .expect("attach again");
    assert_eq!(
        second, first,
        "the same host ports and address are free again"
    );
    network.teardown().await;
    assert!(matches!(
        network
            .attach(&runner("late"), &ns2.path(), false, &[], None)
            .await,
        Err(NetworkError::TornDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_attach_detach_cycles_leave_nothing_behind() {
    common::init_tracing();
    let (tag, octet) = unique();
    let _guard = InstanceGuard(tag.clone());
    let network = HostNetwork::start(config(octet, vec![]), &tag, &[])
        .await
        .expect("start");
    let rules_before = common::sh(
        "nft",
        &["list", "table", "inet", &format!("poseidon_{tag}")],
    );
    let mut with_access = Duration::ZERO;
    let mut without_access = Duration::ZERO;
    let mut used_ports = std::collections::HashSet::new();
    for cycle in 0..200 {
        let ns = TestNs::new(format!("{tag}-c"));
        let access = cycle % 2 == 0;
        let id = runner(&format!("cycle{cycle}"));
        let started = Instant::now();
        let n = network
            .attach(&id, &ns.path(), access, &[8080], None)
            .await
            .expect("attach");
        let took = started.elapsed();
        if access {
            with_access += took;
        } else {
            without_access += took;
        }
        used_ports.insert(host_port(&n));
        network.detach(&id).await;
    }
    assert!(
        links_with_prefix(&format!("pv{tag}-")).is_empty(),
        "no veth left"
    );
    let rules_after = common::sh(
        "nft",
        &["list", "table", "inet", &format!("poseidon_{tag}")],
    );
    assert_eq!(rules_before, rules_after, "no rule added or left");
    let range = config(octet, vec![]).port_range;
    for port in range {
        assert!(
            common::stops_listening(&format!("127.0.0.1:{port}")),
            "port {port} still listens"
        );
    }
    assert!(used_ports.len() > 1, "host ports rotate through the range");
    eprintln!(
        "attach: {:?} mean with network access, {:?} without (100 each); extra {:?}",
        with_access / 100,
        without_access / 100,
        (with_access / 100).saturating_sub(without_access / 100)
    );
    network.teardown().await;
    assert!(
        links_with_prefix(&format!("pb-{tag}")).is_empty(),
        "no bridge left"
    );
    assert!(!table_exists(&tag), "no table left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_after_a_crash_removes_leftovers_but_keeps_surviving_runners() {
    common::init_tracing();
    let (tag, octet) = unique();
    let _guard = InstanceGuard(tag.clone());
    let gateway: Ipv4Addr = format!("10.213.{octet}.1").parse().expect("address");
    let offered = 3000 + u16::from(octet);
    let survivor_ns = TestNs::new(format!("{tag}-s"));
    let lost_ns = TestNs::new(format!("{tag}-l"));
    let (survivor, lost) = (runner("survivor"), runner("lost"));
    let survivor_network = {
        let network = HostNetwork::start(config(octet, vec![offered]), &tag, &[])
            .await
            .expect("start");
        let n = network
            .attach(&survivor, &survivor_ns.path(), true, &[8080], None)
            .await
            .expect("attach");
        network
            .attach(&lost, &lost_ns.path(), true, &[], None)
            .await
            .expect("attach");
        n
        // Dropped without teardown: a crash.
    };
    assert_eq!(links_with_prefix(&format!("pv{tag}-")).len(), 2);
    assert!(table_exists(&tag));
    // The forwarding stops with the process (here: soon after the drop).
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(&survivor_network.mapped_ports[0].host_address).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the listener outlived its network"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let network = HostNetwork::start(
        config(octet, vec![offered]),
        &tag,
        std::slice::from_ref(&survivor),
    )
    .await
    .expect("restart");
    assert_eq!(
        links_with_prefix(&format!("pv{tag}-")).len(),
        1,
        "the lost runner's veth is gone"
    );
    assert!(lost_ns.links().iter().all(|l| l == "lo"));
    let again = network
        .attach(
            &survivor,
            &survivor_ns.path(),
            true,
            &[8080],
            Some(&survivor_network),
        )
        .await
        .expect("re-attach the survivor");
    assert_eq!(again, survivor_network, "same address and host port");
    let offered_service = serve_in(None, addr(gateway, offered));
    assert!(survivor_ns.can_connect(offered_service), "still connected");

    // A second crash, then a start that keeps nothing, then teardown: nothing remains.
    drop(network);
    let network = HostNetwork::start(config(octet, vec![offered]), &tag, &[])
        .await
        .expect("restart keeping nothing");
    assert!(links_with_prefix(&format!("pv{tag}-")).is_empty());
    network.teardown().await;
    network.teardown().await; // idempotent
    assert!(links_with_prefix(&format!("pb-{tag}")).is_empty());
    assert!(!table_exists(&tag));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_already_in_use_is_refused() {
    common::init_tracing();
    let (tag, octet) = unique();
    let (other_tag, _) = unique();
    let _guard = InstanceGuard(tag.clone());
    let _other_guard = InstanceGuard(other_tag.clone());
    let network = HostNetwork::start(config(octet, vec![]), &tag, &[])
        .await
        .expect("start");
    let clash = HostNetwork::start(config(octet, vec![]), &other_tag, &[]).await;
    assert!(
        matches!(clash, Err(NetworkError::SubnetInUse { .. })),
        "{clash:?}"
    );
    network.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_cannot_reach_host_loopback_even_where_the_host_routes_localnet() {
    common::init_tracing();
    let (tag, octet) = unique();
    let _guard = InstanceGuard(tag.clone());
    let gateway = format!("10.213.{octet}.1");
    let network = HostNetwork::start(config(octet, vec![]), &tag, &[])
        .await
        .expect("start");
    let r = TestNs::new(format!("{tag}-lo"));
    network
        .attach(&runner("lo"), &r.path(), true, &[], None)
        .await
        .expect("attach");
    // Root in the runner sends 127.77.0.1 via the gateway; the host accepts loopback
    // destinations from the bridge (as with kube-proxy's `route_localnet=1`). Without the
    // filter, this reaches a host service bound to 127.77.0.1 (checked by hand).
    let ns = r.name.as_str();
    common::sh(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/conf/eth0/route_localnet",
        ],
    );
    common::sh(
        "ip",
        &[
            "-n",
            ns,
            "route",
            "del",
            "local",
            "127.0.0.0/8",
            "dev",
            "lo",
            "table",
            "local",
        ],
    );
    common::quiet(
        "ip",
        &[
            "-n",
            ns,
            "route",
            "add",
            "local",
            "127.0.0.1",
            "dev",
            "lo",
            "table",
            "local",
        ],
    );
    common::sh(
        "ip",
        &[
            "-n",
            ns,
            "route",
            "add",
            "127.77.0.1/32",
            "via",
            &gateway,
            "dev",
            "eth0",
        ],
    );
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/pb-{tag}/route_localnet"),
        "1",
    )
    .expect("route_localnet on the bridge");
    let host_loopback_service = serve_in(None, addr(Ipv4Addr::new(127, 77, 0, 1), 0));
    assert!(fetch_hello(&host_loopback_service.to_string()).is_some());
    assert!(
        !r.can_connect(host_loopback_service),
        "host loopback service"
    );
    network.teardown().await;
}

/// Serves inside `ns` on `port`: every connection gets `hello` and is held open until the
/// client closes its side.
fn serve_and_hold(ns: &TestNs, port: u16) {
    let (ready, listening) = std::sync::mpsc::channel();
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
        ready.send(()).expect("ready");
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = std::io::Write::write_all(&mut stream, b"hello\n");
                let _ = std::io::copy(&mut stream, &mut std::io::sink());
            });
        }
    });
    listening.recv().expect("listener");
}

/// Connects to `address` and reads what arrives first: `Some("hello\n")` for a forwarded
/// connection, `None` for one the proxy closed.
fn greeting(address: &str) -> (std::net::TcpStream, Option<String>) {
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the host port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 6];
    let text = match std::io::Read::read(&mut stream, &mut buf) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
    };
    (stream, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_bounded_per_port_and_per_runner() {
    common::init_tracing();
    let (tag, octet) = unique();
    let _guard = InstanceGuard(tag.clone());
    let config = NetworkConfig {
        max_connections_per_port: 3,
        max_connections_per_runner: 4,
        ..config(octet, vec![])
    };
    let network = HostNetwork::start(config, &tag, &[]).await.expect("start");
    let ns = TestNs::new(format!("{tag}-cap"));
    serve_and_hold(&ns, 7001);
    serve_and_hold(&ns, 7002);
    let id = runner("capped");
    let n = network
        .attach(&id, &ns.path(), false, &[7001, 7002], None)
        .await
        .expect("attach");
    let (a, b) = (
        n.mapped_ports[0].host_address.clone(),
        n.mapped_ports[1].host_address.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let mut open = Vec::new();
        for i in 0..3 {
            let (stream, text) = greeting(&a);
            assert_eq!(
                text.as_deref(),
                Some("hello\n"),
                "connection {i} to port 7001"
            );
            open.push(stream);
        }
        let (_, text) = greeting(&a);
        assert_eq!(text, None, "a fourth connection to one port must be closed");
        let (stream, text) = greeting(&b);
        assert_eq!(
            text.as_deref(),
            Some("hello\n"),
            "the runner's fourth connection"
        );
        open.push(stream);
        let (_, text) = greeting(&b);
        assert_eq!(
            text, None,
            "a fifth connection of the runner must be closed"
        );
        // A closed connection frees its place.
        drop(open.remove(0));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (stream, text) = greeting(&b);
            if text.is_some() {
                open.push(stream);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a freed place was never reused"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("client thread");
    network.detach(&id).await;
    network.teardown().await;
}
