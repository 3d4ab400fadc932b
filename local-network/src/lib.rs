//! Runner networking for the embedded backend (`networkAccess` and `exposedPorts`).
//!
//! A runner's sandbox has its own network namespace with loopback only. This crate owns what
//! connects such a namespace to the world, and nothing else:
//!
//! - **exposed ports**, with or without network access: a listener on
//!   `<bind address>:<host port>` in this process forwards every connection to
//!   `127.0.0.1:<port>` inside the runner (see `proxy`), so no route into the runner is needed
//!   and many runners can expose the same port;
//! - **network access**: one bridge per instance (`pb-<tag>`) with the subnet's first address,
//!   one veth pair per runner (host end `pv<tag>-<hash>` on the bridge as an *isolated* port, so
//!   runners cannot talk to each other; runner end `eth0` with its own address and a default
//!   route via the bridge), IPv4 forwarding, masquerading, and a filter (table
//!   `inet poseidon_<tag>`) that keeps runners away from the host's own services, the blocked
//!   ranges and each other.
//!
//! It never touches objects of another instance: everything it creates is named after the
//! instance tag, and clean-up removes only those names. It shells out to `ip` (iproute2) and `nft`
//! (nftables) rather than speaking netlink itself: both are the kernel's reference tools, the
//! netlink crates for nftables are immature, and one `nft -f` script is an atomic transaction.

mod command;
mod config;
mod error;
mod names;
mod netns;
mod proxy;
mod rules;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use runner_core::{MappedPort, RunnerId};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use config::{Ipv4Net, NetworkConfig};
pub use error::NetworkError;
pub use names::{MAX_TAG_LEN, instance_tag};

use command::{IP, NFT};

/// What a runner got from [`HostNetwork::attach`]; store it with the runner's record and pass it
/// back as `previous` after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunnerNetwork {
    /// The runner's address on the bridge; `None` without network access.
    pub address: Option<Ipv4Addr>,
    /// One entry per distinct exposed port, in the order requested: where it is reachable.
    pub mapped_ports: Vec<MappedPort>,
}

/// This instance's runner networking on this machine: cheap to clone (all clones share one
/// state), `Send + Sync`.
///
/// Dropping the last clone stops all port forwarding but leaves the bridge, veths and rules in
/// place (that is what a crash does); [`HostNetwork::start`] of the same instance cleans them up,
/// [`HostNetwork::teardown`] removes them.
#[derive(Debug, Clone)]
pub struct HostNetwork {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: NetworkConfig,
    tag: String,
    bridge: String,
    /// Parent of every runner's token: fires when the last clone is dropped.
    shutdown: CancellationToken,
    state: Mutex<State>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Debug, Default)]
struct State {
    runners: HashMap<RunnerId, Attachment>,
    /// Veths found by `start` for runners in `keep`, waiting for their `attach`.
    kept: HashMap<RunnerId, Kept>,
    addresses: HashSet<Ipv4Addr>,
    next_address: u32,
    ports: HashSet<u16>,
    next_port: u16,
    veths: HashSet<String>,
    torn_down: bool,
}

#[derive(Debug)]
struct Attachment {
    veth: Option<String>,
    address: Option<Ipv4Addr>,
    ports: Vec<u16>,
    cancel: CancellationToken,
    listeners: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct Kept {
    veth: String,
    address: Option<Ipv4Addr>,
}

/// One entry of `ip -j link show`.
#[derive(Debug, Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    ifalias: Option<String>,
}

/// One entry of `ip -j addr show`.
#[derive(Debug, Deserialize)]
struct LinkAddresses {
    ifname: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    family: String,
    local: String,
    prefixlen: u8,
}

impl HostNetwork {
    /// Sets up this instance's bridge and rules.
    ///
    /// `instance` is a short stable tag (1 to [`MAX_TAG_LEN`] characters of `[0-9a-z]`, see
    /// [`instance_tag`]) derived from the data directory; everything created on the host is named
    /// after it. Leftovers of a crashed previous run of the same instance are removed, except the
    /// veths of runners listed in `keep` (they survive a server restart; `attach` them again with
    /// their recorded [`RunnerNetwork`] before attaching new runners, so their addresses and host
    /// ports are still free). Turns on IPv4 forwarding if it is off (it stays on).
    ///
    /// Needs root (`CAP_NET_ADMIN`) and the `ip` and `nft` tools.
    pub async fn start(
        config: NetworkConfig,
        instance: &str,
        keep: &[RunnerId],
    ) -> Result<HostNetwork, NetworkError> {
        config.validate()?;
        names::validate_tag(instance)?;
        IP.check()?;
        NFT.check()?;
        let bridge = names::bridge(instance);
        let mut state = State::default();

        let links: Vec<Link> = parse_json(IP.run(&["-j", "link", "show"], None, None).await?)?;
        let prefix = names::veth_prefix(instance);
        let keep: HashSet<&RunnerId> = keep.iter().collect();
        for link in links.iter().filter(|l| l.ifname.starts_with(&prefix)) {
            let owner = link.ifalias.as_deref().and_then(parse_alias);
            match owner {
                Some((runner, address)) if keep.contains(&runner) => {
                    debug!(runner_id = %runner, veth = %link.ifname, "keeping a runner's veth");
                    state.veths.insert(link.ifname.clone());
                    state.addresses.extend(address);
                    state.kept.insert(
                        runner,
                        Kept {
                            veth: link.ifname.clone(),
                            address,
                        },
                    );
                }
                _ => {
                    info!(veth = %link.ifname, "removing a leftover veth");
                    delete_link(&link.ifname).await?;
                }
            }
        }
        let bridge_exists = links.iter().any(|l| l.ifname == bridge);
        if bridge_exists && state.kept.is_empty() {
            info!(bridge = %bridge, "removing a leftover bridge");
            delete_link(&bridge).await?;
        }
        check_subnet_free(&config.bridge_subnet, &bridge).await?;
        create_bridge(&config, &bridge, bridge_exists && !state.kept.is_empty()).await?;
        enable_forwarding()?;
        NFT.run(&["-f", "-"], Some(&rules::ruleset(&config, instance)), None)
            .await?;
        info!(
            instance,
            bridge = %bridge,
            subnet = %config.bridge_subnet,
            kept = state.kept.len(),
            "runner network ready"
        );
        Ok(HostNetwork {
            inner: Arc::new(Inner {
                config,
                tag: instance.to_owned(),
                bridge,
                shutdown: CancellationToken::new(),
                state: Mutex::new(state),
            }),
        })
    }

    /// The configuration this network was started with.
    pub fn config(&self) -> &NetworkConfig {
        &self.inner.config
    }

    /// The bridge's own address: the runners' gateway, and the only host address they may reach
    /// (on [`NetworkConfig::host_ports`]).
    pub fn gateway(&self) -> Ipv4Addr {
        self.inner.config.gateway()
    }

    /// Connects the runner whose network namespace is `netns` (a path like `/proc/<pid>/ns/net`;
    /// the namespace is held open while the runner is attached, so a recycled pid cannot redirect
    /// anything).
    ///
    /// With `access`, the runner gets a veth pair on the bridge with its own address and a
    /// default route (its loopback is brought up too); without, nothing changes in its namespace.
    /// Always, each distinct port of `exposed_ports` gets a host port from
    /// [`NetworkConfig::port_range`] whose connections are forwarded to `127.0.0.1:<port>` inside
    /// the runner. `previous` (the runner's record after a restart) asks for the same address and
    /// host ports; a host port taken meanwhile is replaced by a fresh one (logged), so store the
    /// returned value. On error nothing of the runner is left behind.
    pub async fn attach(
        &self,
        runner: &RunnerId,
        netns: &Path,
        access: bool,
        exposed_ports: &[u16],
        previous: Option<&RunnerNetwork>,
    ) -> Result<RunnerNetwork, NetworkError> {
        let namespace = Arc::new(netns::open_netns(netns)?);
        let mut exposed = Vec::with_capacity(exposed_ports.len());
        for port in exposed_ports {
            if !exposed.contains(port) {
                exposed.push(*port);
            }
        }
        let (reserved, kept) = self.reserve(runner, access, &exposed, previous)?;
        let wired = match (&reserved.veth, reserved.address) {
            (Some(veth), Some(address)) if !kept => {
                self.connect(runner, veth, address, netns, &namespace).await
            }
            _ => Ok(()),
        };
        if let Err(error) = wired {
            warn!(runner_id = %runner, %error, "cannot connect the runner to the bridge");
            drop(reserved.listeners);
            self.detach(runner).await;
            return Err(error);
        }
        let mut handles = Vec::with_capacity(exposed.len());
        let runner_proxy = if exposed.is_empty() {
            None
        } else {
            match netns::SocketFactory::start(Arc::clone(&namespace)) {
                Ok(sockets) => Some(proxy::RunnerProxy {
                    runner: runner.clone(),
                    sockets,
                    connections: Arc::new(tokio::sync::Semaphore::new(
                        self.inner.config.max_connections_per_runner,
                    )),
                    cancel: reserved.cancel.clone(),
                }),
                Err(error) => {
                    reserved.cancel.cancel();
                    self.detach(runner).await;
                    return Err(NetworkError::io(
                        "cannot start the runner's namespace thread",
                        error,
                    ));
                }
            }
        };
        for (listener, port) in reserved.listeners.into_iter().zip(&exposed) {
            let Some(runner_proxy) = runner_proxy.clone() else {
                break;
            };
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => handles.push(proxy::spawn(
                    runner_proxy,
                    listener,
                    *port,
                    self.inner.config.max_connections_per_port,
                )),
                Err(error) => {
                    reserved.cancel.cancel();
                    self.detach(runner).await;
                    return Err(NetworkError::io(
                        "cannot register a host-port listener",
                        error,
                    ));
                }
            }
        }
        let raced = {
            let mut state = self.lock();
            match state.runners.get_mut(runner) {
                Some(attachment) => {
                    attachment.listeners = handles;
                    false
                }
                None => true,
            }
        };
        if raced {
            // Detached while attaching: the caller no longer wants the runner.
            reserved.cancel.cancel();
            return Err(NetworkError::Io {
                context: format!("runner {runner} was detached while attaching"),
                source: std::io::Error::from(std::io::ErrorKind::Interrupted),
            });
        }
        let mapped_ports = exposed
            .iter()
            .zip(&reserved.host_ports)
            .map(|(port, host_port)| MappedPort {
                exposed_port: *port,
                host_address: format!("{}:{host_port}", self.inner.config.advertised_host),
            })
            .collect();
        info!(
            runner_id = %runner,
            address = ?reserved.address,
            ports = ?reserved.host_ports,
            "runner network attached"
        );
        Ok(RunnerNetwork {
            address: reserved.address,
            mapped_ports,
        })
    }

    /// Releases everything of the runner: its connections and listeners (the host ports are free
    /// when this returns), its veth pair and its address. Idempotent; also forgets a veth kept by
    /// `start` that was never attached again.
    pub async fn detach(&self, runner: &RunnerId) {
        let (attachment, kept) = {
            let mut state = self.lock();
            (state.runners.remove(runner), state.kept.remove(runner))
        };
        let mut veths = Vec::new();
        let mut addresses = Vec::new();
        let mut ports = Vec::new();
        if let Some(attachment) = attachment {
            attachment.cancel.cancel();
            for listener in attachment.listeners {
                // The task ends at once when cancelled; a panic in it has already been logged.
                let _ = listener.await;
            }
            veths.extend(attachment.veth);
            addresses.extend(attachment.address);
            ports = attachment.ports;
        }
        if let Some(kept) = kept {
            veths.push(kept.veth);
            addresses.extend(kept.address);
        }
        for veth in &veths {
            if let Err(error) = delete_link(veth).await {
                warn!(runner_id = %runner, veth, %error, "cannot delete the runner's veth");
            }
        }
        let mut state = self.lock();
        for veth in veths {
            state.veths.remove(&veth);
        }
        for address in addresses {
            state.addresses.remove(&address);
        }
        for port in ports {
            state.ports.remove(&port);
        }
        debug!(runner_id = %runner, "runner network detached");
    }

    /// Removes everything of this instance: all runners' forwarding and veths, the bridge and the
    /// rules (server shutdown with no runners to keep, and tests). Idempotent; `attach` fails
    /// afterwards.
    pub async fn teardown(&self) {
        let runners: Vec<RunnerId> = {
            let mut state = self.lock();
            state.torn_down = true;
            state
                .runners
                .keys()
                .chain(state.kept.keys())
                .cloned()
                .collect()
        };
        for runner in &runners {
            self.detach(runner).await;
        }
        let prefix = names::veth_prefix(&self.inner.tag);
        match IP.run(&["-j", "link", "show"], None, None).await {
            Ok(output) => {
                let links: Vec<Link> = parse_json(output).unwrap_or_default();
                for link in links.iter().filter(|l| l.ifname.starts_with(&prefix)) {
                    if let Err(error) = delete_link(&link.ifname).await {
                        warn!(veth = %link.ifname, %error, "cannot delete a veth");
                    }
                }
            }
            Err(error) => warn!(%error, "cannot list links"),
        }
        if let Err(error) = delete_link(&self.inner.bridge).await {
            warn!(bridge = %self.inner.bridge, %error, "cannot delete the bridge");
        }
        if let Err(error) = NFT
            .run(&["-f", "-"], Some(&rules::removal(&self.inner.tag)), None)
            .await
        {
            warn!(%error, "cannot delete the nftables table");
        }
        info!(instance = %self.inner.tag, "runner network torn down");
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent sets (every update is one insert or
        // remove), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reserves the runner's address, veth name and host ports and records the runner; returns
    /// also whether its veth survived a restart (kept by `start`).
    fn reserve(
        &self,
        runner: &RunnerId,
        access: bool,
        exposed: &[u16],
        previous: Option<&RunnerNetwork>,
    ) -> Result<(Reserved, bool), NetworkError> {
        let config = &self.inner.config;
        let mut state = self.lock();
        if state.torn_down {
            return Err(NetworkError::TornDown);
        }
        if state.runners.contains_key(runner) {
            return Err(NetworkError::AlreadyAttached(runner.clone()));
        }
        let (reuse, stale_kept) = match state.kept.remove(runner) {
            Some(kept) if access && kept.address.is_some() => (Some(kept), None),
            // It had access before the restart but not now (or its alias was unreadable):
            // its veth goes, a fresh one is made if needed.
            other => (None, other),
        };
        let reused = reuse.is_some();
        let attachment = Attachment {
            veth: reuse.as_ref().map(|k| k.veth.clone()),
            address: reuse.and_then(|k| k.address),
            ports: Vec::new(),
            cancel: self.inner.shutdown.child_token(),
            listeners: Vec::new(),
        };
        // Record the runner first, so `detach` releases whatever is reserved from here on.
        state.runners.insert(runner.clone(), attachment);
        let result = reserve_resources(
            config,
            &self.inner.tag,
            &mut state,
            runner,
            access && !reused,
            exposed,
            previous,
        );
        drop(state);
        if let Some(stale) = stale_kept {
            let mut state = self.lock();
            state.veths.remove(&stale.veth);
            if let Some(address) = stale.address {
                state.addresses.remove(&address);
            }
            drop(state);
            let veth = stale.veth;
            tokio::spawn(async move {
                if let Err(error) = delete_link(&veth).await {
                    warn!(veth, %error, "cannot delete a kept veth");
                }
            });
        }
        match result {
            Ok(mut reserved) => {
                let state = self.lock();
                let attachment = state.runners.get(runner);
                reserved.veth = attachment.and_then(|a| a.veth.clone());
                reserved.address = attachment.and_then(|a| a.address);
                reserved.cancel = attachment.map(|a| a.cancel.clone()).unwrap_or_default();
                Ok((reserved, reused))
            }
            Err(error) => {
                // Synchronous release: nothing was created on the host yet.
                let mut state = self.lock();
                if let Some(attachment) = state.runners.remove(runner) {
                    attachment.veth.map(|v| state.veths.remove(&v));
                    attachment.address.map(|a| state.addresses.remove(&a));
                    for port in attachment.ports {
                        state.ports.remove(&port);
                    }
                }
                Err(error)
            }
        }
    }

    /// Creates the runner's veth pair on the bridge and configures its end inside `namespace`.
    async fn connect(
        &self,
        runner: &RunnerId,
        veth: &str,
        address: Ipv4Addr,
        netns_path: &Path,
        namespace: &OwnedFd,
    ) -> Result<(), NetworkError> {
        let path = netns_path
            .to_str()
            .filter(|p| batch_safe(p))
            .ok_or_else(|| {
                NetworkError::InvalidConfig(format!(
                    "network namespace path {} contains characters `ip -batch` cannot take",
                    netns_path.display()
                ))
            })?;
        let alias = format!("{runner}@{address}");
        if !batch_safe(&alias) {
            return Err(NetworkError::InvalidConfig(format!(
                "runner id `{runner}` contains characters an interface alias cannot take"
            )));
        }
        let bridge = &self.inner.bridge;
        let host_side = format!(
            "link add {veth} type veth peer name eth0 netns {path}\n\
             link set dev {veth} master {bridge} alias {alias} up\n\
             link set dev {veth} type bridge_slave isolated on\n"
        );
        IP.run(&["-batch", "-"], Some(&host_side), None).await?;
        let prefix = self.inner.config.bridge_subnet.prefix();
        let gateway = self.inner.config.gateway();
        let runner_side = format!(
            "link set dev lo up\n\
             addr add {address}/{prefix} dev eth0\n\
             link set dev eth0 up\n\
             route add default via {gateway} dev eth0\n"
        );
        IP.run(&["-batch", "-"], Some(&runner_side), Some(namespace))
            .await?;
        Ok(())
    }
}

/// What `reserve` hands to `attach`.
struct Reserved {
    veth: Option<String>,
    address: Option<Ipv4Addr>,
    host_ports: Vec<u16>,
    listeners: Vec<TcpListener>,
    cancel: CancellationToken,
}

/// Picks an address and veth name (when `access`) and binds one host port per exposed port,
/// recording each in `state` and in the runner's attachment as it goes.
fn reserve_resources(
    config: &NetworkConfig,
    tag: &str,
    state: &mut State,
    runner: &RunnerId,
    access: bool,
    exposed: &[u16],
    previous: Option<&RunnerNetwork>,
) -> Result<Reserved, NetworkError> {
    if access {
        let wanted = previous.and_then(|p| p.address);
        let address = allocate_address(config, state, wanted)?;
        let veth = (0..64)
            .map(|attempt| names::veth(tag, runner.as_str(), attempt))
            .find(|name| !state.veths.contains(name))
            .ok_or(NetworkError::AddressesExhausted)?;
        state.addresses.insert(address);
        state.veths.insert(veth.clone());
        if let Some(attachment) = state.runners.get_mut(runner) {
            attachment.address = Some(address);
            attachment.veth = Some(veth);
        }
    }
    let mut host_ports = Vec::with_capacity(exposed.len());
    let mut listeners = Vec::with_capacity(exposed.len());
    for port in exposed {
        let wanted = previous.and_then(|p| {
            p.mapped_ports
                .iter()
                .find(|m| m.exposed_port == *port)
                .and_then(|m| m.host_address.rsplit_once(':'))
                .and_then(|(_, host_port)| host_port.parse::<u16>().ok())
        });
        let (host_port, listener) = bind_host_port(config, state, wanted, runner)?;
        state.ports.insert(host_port);
        if let Some(attachment) = state.runners.get_mut(runner) {
            attachment.ports.push(host_port);
        }
        host_ports.push(host_port);
        listeners.push(listener);
    }
    Ok(Reserved {
        veth: None,
        address: None,
        host_ports,
        listeners,
        cancel: CancellationToken::new(),
    })
}

/// A free runner address: `wanted` if it is free and usable, else the next free one after the
/// last handed out (so a released address is reused as late as possible).
fn allocate_address(
    config: &NetworkConfig,
    state: &mut State,
    wanted: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, NetworkError> {
    let subnet = config.bridge_subnet;
    let first = u32::from(config.gateway()) + 1;
    let last = u32::from(subnet.last()) - 1; // the broadcast address is not a host's
    let usable = |a: u32| (first..=last).contains(&a);
    if let Some(wanted) = wanted.filter(|w| usable(u32::from(*w)) && !state.addresses.contains(w)) {
        return Ok(wanted);
    }
    let count = last - first + 1;
    for step in 0..count {
        let candidate = first + (state.next_address.wrapping_add(step) % count);
        if !state.addresses.contains(&Ipv4Addr::from(candidate)) {
            state.next_address = candidate - first + 1;
            return Ok(Ipv4Addr::from(candidate));
        }
    }
    Err(NetworkError::AddressesExhausted)
}

/// Binds a host port: `wanted` if it is ours to give and free, else the next port of the range
/// after the last handed out that this instance does not use and the system lets us bind.
fn bind_host_port(
    config: &NetworkConfig,
    state: &mut State,
    wanted: Option<u16>,
    runner: &RunnerId,
) -> Result<(u16, TcpListener), NetworkError> {
    let range = &config.port_range;
    let bind = |port: u16| -> Option<TcpListener> {
        let listener = TcpListener::bind(SocketAddr::new(config.bind_address, port)).ok()?;
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    };
    if let Some(wanted) = wanted.filter(|w| range.contains(w) && !state.ports.contains(w)) {
        if let Some(listener) = bind(wanted) {
            return Ok((wanted, listener));
        }
        warn!(runner_id = %runner, port = wanted, "the previous host port is taken; using another");
    } else if let Some(wanted) = wanted {
        warn!(runner_id = %runner, port = wanted, "the previous host port is not available; using another");
    }
    let start = u32::from(*range.start());
    let count = u32::from(*range.end()) - start + 1;
    for step in 0..count {
        let offset = (u32::from(state.next_port) + step) % count;
        let Ok(port) = u16::try_from(start + offset) else {
            continue;
        };
        if state.ports.contains(&port) {
            continue;
        }
        if let Some(listener) = bind(port) {
            state.next_port = u16::try_from((offset + 1) % count).unwrap_or(0);
            return Ok((port, listener));
        }
    }
    Err(NetworkError::PortsExhausted)
}

/// Whether `text` is one token for `ip -batch` (no blanks, quotes, escapes or comments).
fn batch_safe(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\' | '#'))
}

/// Splits a veth alias `<runner id>@<address>`.
fn parse_alias(alias: &str) -> Option<(RunnerId, Option<Ipv4Addr>)> {
    let (runner, address) = alias.rsplit_once('@')?;
    Some((RunnerId::new(runner), address.parse().ok()))
}

fn parse_json<T: serde::de::DeserializeOwned>(text: String) -> Result<T, NetworkError> {
    serde_json::from_str(&text).map_err(|e| NetworkError::Command {
        command: "ip -j".into(),
        detail: format!("unexpected output: {e}"),
    })
}

/// Deletes an interface; one that does not exist (any more) is fine.
async fn delete_link(name: &str) -> Result<(), NetworkError> {
    match IP.run(&["link", "del", "dev", name], None, None).await {
        Ok(_) => Ok(()),
        Err(NetworkError::Command { detail, .. })
            if detail.contains("Cannot find device") || detail.contains("does not exist") =>
        {
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Fails when another interface has an address in `subnet` (a second instance with the same
/// subnet, or the site's own network): routing to runners would be ambiguous.
async fn check_subnet_free(subnet: &Ipv4Net, bridge: &str) -> Result<(), NetworkError> {
    let links: Vec<LinkAddresses> = parse_json(IP.run(&["-j", "addr", "show"], None, None).await?)?;
    for link in links.iter().filter(|l| l.ifname != bridge) {
        for info in link.addr_info.iter().filter(|i| i.family == "inet") {
            let Ok(local) = info.local.parse::<Ipv4Addr>() else {
                continue;
            };
            let existing = Ipv4Net::new(local, info.prefixlen)?;
            if existing.overlaps(subnet) {
                return Err(NetworkError::SubnetInUse {
                    subnet: subnet.to_string(),
                    existing: format!("{local}/{}", info.prefixlen),
                    interface: link.ifname.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Creates the bridge with the gateway address (or, when it survived with kept runners, makes
/// sure it has the address and is up). IPv6 is off on it: runners get IPv4 only.
async fn create_bridge(
    config: &NetworkConfig,
    bridge: &str,
    exists: bool,
) -> Result<(), NetworkError> {
    if !exists {
        IP.run(
            &["link", "add", "name", bridge, "type", "bridge"],
            None,
            None,
        )
        .await?;
    }
    let ipv6 = format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6");
    if Path::new(&ipv6).exists() {
        std::fs::write(&ipv6, "1").map_err(|e| NetworkError::io(format!("writing {ipv6}"), e))?;
    }
    let address = format!("{}/{}", config.gateway(), config.bridge_subnet.prefix());
    let script = format!(
        "addr replace {address} dev {bridge}\n\
         link set dev {bridge} up\n"
    );
    IP.run(&["-batch", "-"], Some(&script), None).await?;
    Ok(())
}

/// Turns on IPv4 forwarding (needed for any routed traffic; it stays on, as other software on
/// the machine may rely on it once it is on).
fn enable_forwarding() -> Result<(), NetworkError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let current = std::fs::read_to_string(PATH)
        .map_err(|e| NetworkError::io(format!("reading {PATH}"), e))?;
    if current.trim() != "1" {
        std::fs::write(PATH, "1").map_err(|e| NetworkError::io(format!("writing {PATH}"), e))?;
        info!("IPv4 forwarding turned on");
    }
    Ok(())
}

// Keep the handle shareable across tasks and threads.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<HostNetwork>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_name_the_runner_and_its_address() {
        let (runner, address) = parse_alias("29-ab70831e@10.213.0.7").expect("an alias");
        assert_eq!(runner.as_str(), "29-ab70831e");
        assert_eq!(address, Some(Ipv4Addr::new(10, 213, 0, 7)));
        assert!(parse_alias("no-address").is_none());
    }

    #[test]
    fn batch_tokens_refuse_blanks_and_quotes() {
        assert!(batch_safe("/proc/42/ns/net"));
        assert!(batch_safe("29-ab70831e-89b2@10.213.0.7"));
        for bad in ["", "a b", "a\"b", "a'b", "a#b", "a\\b", "a\nb"] {
            assert!(!batch_safe(bad), "{bad:?}");
        }
    }

    #[test]
    fn addresses_skip_gateway_and_broadcast_and_rotate() {
        let config = NetworkConfig {
            bridge_subnet: "10.9.0.0/29".parse().expect("valid"),
            ..NetworkConfig::default()
        };
        let mut state = State::default();
        let mut seen = Vec::new();
        while let Ok(address) = allocate_address(&config, &mut state, None) {
            state.addresses.insert(address);
            seen.push(address.octets()[3]);
        }
        assert_eq!(seen, vec![2, 3, 4, 5, 6]);
        state.addresses.remove(&Ipv4Addr::new(10, 9, 0, 3));
        let again = allocate_address(&config, &mut state, Some(Ipv4Addr::new(10, 9, 0, 3)));
        assert_eq!(again.ok(), Some(Ipv4Addr::new(10, 9, 0, 3)));
    }
}
