//! Test fixtures: unique instance tags and subnets, test network namespaces standing in for
//! runners and for "the outside", listeners inside them, and clean-up on drop (also when a test
//! fails). Traffic only ever goes to addresses these fixtures or the crate created.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use local_network::NetworkConfig;
use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique 6-character tag and a unique third octet for this test's subnets.
pub fn unique() -> (String, u8) {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let value = ((std::process::id() & 0xF_FFFF) << 5) | (n & 0x1F);
    let mut tag = String::from("t");
    let mut v = value;
    for _ in 0..5 {
        let d = (v % 36) as u8;
        tag.push(char::from(if d < 10 { b'0' + d } else { b'a' + d - 10 }));
        v /= 36;
    }
    let octet = (((std::process::id() % 7) * 32 + n) % 250 + 1) as u8;
    (tag, octet)
}

/// Runs a command and panics with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command, ignoring failure (clean-up).
pub fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A config for instance `octet`: bridge 10.213.<octet>.0/24, small port range of its own.
pub fn config(octet: u8, host_ports: Vec<u16>) -> NetworkConfig {
    let base = 21000 + u16::from(octet) * 40;
    NetworkConfig {
        bridge_subnet: format!("10.213.{octet}.0/24")
            .parse()
            .expect("valid subnet"),
        port_range: base..=base + 39,
        host_ports,
        ..NetworkConfig::default()
    }
}

/// Removes whatever the crate may have created for `tag`, whether or not it exists.
pub struct InstanceGuard(pub String);

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        let tag = &self.0;
        for name in links_with_prefix(&format!("pv{tag}-")) {
            quiet("ip", &["link", "del", "dev", &name]);
        }
        quiet("ip", &["link", "del", "dev", &format!("pb-{tag}")]);
        quiet(
            "nft",
            &["delete", "table", "inet", &format!("poseidon_{tag}")],
        );
    }
}

/// Names of the host's interfaces that start with `prefix`.
pub fn links_with_prefix(prefix: &str) -> Vec<String> {
    let json = sh("ip", &["-j", "link", "show"]);
    let links: Vec<serde_json::Value> = serde_json::from_str(&json).expect("ip -j output");
    links
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Whether the nftables table of `tag` exists.
pub fn table_exists(tag: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", &format!("poseidon_{tag}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A network namespace made with `ip netns add`, loopback up; deleted on drop.
pub struct TestNs {
    pub name: String,
    children: Vec<Child>,
}

impl TestNs {
    pub fn new(name: String) -> Self {
        quiet("ip", &["netns", "del", &name]);
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "dev", "lo", "up"]);
        Self {
            name,
            children: Vec::new(),
        }
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Interface names inside the namespace.
    pub fn links(&self) -> Vec<String> {
        let json = sh("ip", &["-n", &self.name, "-j", "link", "show"]);
        let links: Vec<serde_json::Value> = serde_json::from_str(&json).expect("ip -j output");
        links
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
            .collect()
    }

    /// Starts a program inside the namespace; it is killed on drop.
    pub fn spawn(&mut self, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in namespace");
        self.children.push(child);
    }

    /// Serves on `addr` (port 0 = any) inside the namespace: each connection gets `hello`.
    pub fn serve(&self, addr: SocketAddr) -> SocketAddr {
        serve_in(Some(&self.path()), addr)
    }

    /// Whether a TCP connection from inside the namespace to `addr` succeeds (1 s timeout).
    pub fn can_connect(&self, addr: SocketAddr) -> bool {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        })
        .join()
        .expect("connect thread")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        quiet("ip", &["netns", "del", &self.name]);
    }
}

fn enter(path: &Path) {
    let file = std::fs::File::open(path).expect("open netns");
    setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Serves `hello` on `addr`, in namespace `netns` (or the host's); returns the bound address.
pub fn serve_in(netns: Option<&Path>, addr: SocketAddr) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    let netns = netns.map(Path::to_owned);
    std::thread::spawn(move || {
        if let Some(path) = &netns {
            enter(path);
        }
        let listener = TcpListener::bind(addr).expect("bind test listener");
        tx.send(listener.local_addr().expect("local addr"))
            .expect("send addr");
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"hello\n");
        }
    });
    rx.recv().expect("listener address")
}

/// Connects from the host to `addr` and reads everything (for `hello` listeners).
pub fn fetch_hello(addr: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// `GET <path>` over HTTP/1.0 from the host; the whole response.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// A namespace that stands for "the outside": a veth pair to the host with addresses
/// `198.18.<octet>.2` and (blocked by default) `169.254.<octet>.2`; the host end
/// `tno<tag>` has `.1` of both.
pub struct Outside {
    pub ns: TestNs,
    host_link: String,
    pub public: Ipv4Addr,
    pub link_local: Ipv4Addr,
    pub host_address: Ipv4Addr,
}

impl Outside {
    pub fn new(tag: &str, octet: u8) -> Self {
        let ns = TestNs::new(format!("{tag}-out"));
        let host_link = format!("tno{tag}");
        quiet("ip", &["link", "del", "dev", &host_link]);
        let path = ns.path();
        let path = path.to_str().expect("utf-8 path");
        sh(
            "ip",
            &[
                "link", "add", &host_link, "type", "veth", "peer", "name", "eth0", "netns", path,
            ],
        );
        let public = format!("198.18.{octet}");
        let link_local = format!("169.254.{octet}");
        for (dev, netns, last) in [(host_link.as_str(), None, 1), ("eth0", Some(&ns.name), 2)] {
            let mut prefix: Vec<&str> = Vec::new();
            if let Some(name) = netns {
                prefix.extend(["-n", name.as_str()]);
            }
            for net in [&public, &link_local] {
                let address = format!("{net}.{last}/24");
                let mut args = prefix.clone();
                args.extend(["addr", "add", &address, "dev", dev]);
                sh("ip", &args);
            }
            let mut args = prefix.clone();
            args.extend(["link", "set", "dev", dev, "up"]);
            sh("ip", &args);
        }
        sh(
            "ip",
            &[
                "-n",
                &ns.name,
                "route",
                "add",
                "default",
                "via",
                &format!("{public}.1"),
            ],
        );
        Self {
            ns,
            host_link,
            public: format!("{public}.2").parse().expect("address"),
            link_local: format!("{link_local}.2").parse().expect("address"),
            host_address: format!("{public}.1").parse().expect("address"),
        }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        quiet("ip", &["link", "del", "dev", &self.host_link]);
    }
}

/// A tracing subscriber for the test's logs (once per process).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "local_network=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Whether connecting to `address` is refused within a few seconds. A freed listener can
/// linger for a moment in a child this test process is forking for `ip`/`nft` (the copy of the
/// descriptor table lives until the child's exec), so one lucky connect proves nothing.
pub fn stops_listening(address: &str) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if std::net::TcpStream::connect(address).is_err() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
