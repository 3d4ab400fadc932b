//! The nftables ruleset of one instance, as one atomic `nft -f` script.
//!
//! Everything lives in the table `inet poseidon_<tag>`, so replacing or deleting the table is the
//! whole clean-up and never touches another program's rules. The table's base chains add to
//! whatever else the host filters: a packet another table drops stays dropped.

use std::fmt::Write;

use crate::config::NetworkConfig;
use crate::names;

/// The script that (re)creates the instance's table: the leading `table` + `delete table` pair
/// removes an old table of the same name (and does not fail when there is none), and `nft -f`
/// applies the whole script in one transaction.
pub(crate) fn ruleset(config: &NetworkConfig, tag: &str) -> String {
    let table = names::table(tag);
    let bridge = names::bridge(tag);
    let subnet = config.bridge_subnet;
    let gateway = config.gateway();
    let blocked = config
        .blocked_ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut script = String::new();
    // `write!` to a `String` cannot fail.
    let _ = writeln!(
        script,
        "table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{"
    );
    if !blocked.is_empty() {
        let _ = writeln!(
            script,
            "  set blocked {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {blocked} }}; }}"
        );
    }
    // Runners to the host: only the bridge address, only the configured host ports.
    let _ = writeln!(
        script,
        "  chain input {{\n\
         \x20   type filter hook input priority filter; policy accept;\n\
         \x20   iifname \"{bridge}\" jump runners_to_host\n\
         \x20 }}\n\
         \x20 chain runners_to_host {{\n\
         \x20   ct state established,related accept\n\
         \x20   meta nfproto ipv6 drop\n\
         \x20   ip saddr != {subnet} drop\n\
         \x20   ip daddr != {gateway} drop"
    );
    if !config.host_ports.is_empty() {
        let ports = config
            .host_ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            script,
            "    meta l4proto {{ tcp, udp }} th dport {{ {ports} }} accept"
        );
    }
    let _ = writeln!(script, "    drop\n  }}");
    // Runners through the host: anywhere but loopback, blocked ranges and other runners;
    // nothing may open a connection to a runner.
    let _ = writeln!(
        script,
        "  chain forward {{\n\
         \x20   type filter hook forward priority filter; policy accept;\n\
         \x20   iifname \"{bridge}\" jump from_runners\n\
         \x20   oifname \"{bridge}\" jump to_runners\n\
         \x20 }}\n\
         \x20 chain from_runners {{\n\
         \x20   meta nfproto ipv6 drop\n\
         \x20   ip saddr != {subnet} drop\n\
         \x20   oifname \"{bridge}\" drop\n\
         \x20   ip daddr 127.0.0.0/8 drop"
    );
    if !blocked.is_empty() {
        let _ = writeln!(script, "    ip daddr @blocked drop");
    }
    let _ = writeln!(
        script,
        "    accept\n\
         \x20 }}\n\
         \x20 chain to_runners {{\n\
         \x20   ct state established,related accept\n\
         \x20   drop\n\
         \x20 }}\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   ip saddr {subnet} oifname != \"{bridge}\" masquerade\n\
         \x20 }}\n\
         }}"
    );
    script
}

/// The script that removes the instance's table, whether or not it exists.
pub(crate) fn removal(tag: &str) -> String {
    let table = names::table(tag);
    format!("table inet {table}\ndelete table inet {table}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_names_the_instance_and_guards_the_host() {
        let config = NetworkConfig {
            host_ports: vec![3128],
            ..NetworkConfig::default()
        };
        let script = ruleset(&config, "abc123");
        assert!(
            script.starts_with("table inet poseidon_abc123\ndelete table inet poseidon_abc123\n")
        );
        assert!(script.contains("iifname \"pb-abc123\" jump runners_to_host"));
        assert!(script.contains("ip daddr != 10.213.0.1 drop"));
        assert!(script.contains("th dport { 3128 } accept"));
        assert!(script.contains("169.254.0.0/16"));
        assert!(script.contains("ip saddr 10.213.0.0/16 oifname != \"pb-abc123\" masquerade"));
        assert_eq!(script.matches('{').count(), script.matches('}').count());
    }

    #[test]
    fn empty_lists_leave_out_their_rules() {
        let config = NetworkConfig {
            blocked_ranges: Vec::new(),
            ..NetworkConfig::default()
        };
        let script = ruleset(&config, "t");
        assert!(!script.contains("@blocked"));
        assert!(!script.contains("th dport"));
        assert_eq!(script.matches('{').count(), script.matches('}').count());
    }
}
