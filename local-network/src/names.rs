//! Names of everything this crate creates on the host, all derived from the instance tag, so an
//! instance finds (and removes) exactly its own objects and never another instance's.
//!
//! - bridge `pb-<tag>`;
//! - host end of a runner's veth pair `pv<tag>-<hash>` (15 bytes, the kernel's limit), its alias
//!   `<runner id>@<address>` so the runner is known again after a restart;
//! - the runner's end is `eth0` inside the runner's namespace;
//! - nftables table `inet poseidon_<tag>`.

use std::path::Path;

use crate::error::NetworkError;

/// Longest instance tag: leaves at least 6 hash characters in a 15-byte veth name.
pub const MAX_TAG_LEN: usize = 6;
/// Linux's limit on interface names (`IFNAMSIZ` minus the terminating NUL).
const IFNAME_MAX: usize = 15;
const BASE36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A stable instance tag for a data directory: 6 characters of `[0-9a-z]` hashed from the path.
///
/// Pass the canonical path of the data directory so that `./data` and `/srv/poseidon/data` name
/// the same instance; two data directories get different tags (up to a 1-in-2-billion collision).
pub fn instance_tag(data_dir: &Path) -> String {
    base36(fnv1a(data_dir.as_os_str().as_encoded_bytes()), MAX_TAG_LEN)
}

/// Checks that `tag` is 1 to [`MAX_TAG_LEN`] characters of `[0-9a-z]`.
pub(crate) fn validate_tag(tag: &str) -> Result<(), NetworkError> {
    let valid = (1..=MAX_TAG_LEN).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    if valid {
        Ok(())
    } else {
        Err(NetworkError::InvalidConfig(format!(
            "instance tag `{tag}` must be 1 to {MAX_TAG_LEN} characters of [0-9a-z]"
        )))
    }
}

/// The bridge of instance `tag`.
pub(crate) fn bridge(tag: &str) -> String {
    format!("pb-{tag}")
}

/// The nftables table (family `inet`) of instance `tag`.
pub(crate) fn table(tag: &str) -> String {
    format!("poseidon_{tag}")
}

/// The prefix of every host-side veth of instance `tag`.
pub(crate) fn veth_prefix(tag: &str) -> String {
    format!("pv{tag}-")
}

/// The host-side veth name for `runner` in instance `tag`; `attempt` salts the hash when the
/// first name clashes with another runner's.
pub(crate) fn veth(tag: &str, runner: &str, attempt: u32) -> String {
    let prefix = veth_prefix(tag);
    let mut input = runner.as_bytes().to_vec();
    input.extend_from_slice(&attempt.to_le_bytes());
    let hash = base36(fnv1a(&input), IFNAME_MAX - prefix.len());
    format!("{prefix}{hash}")
}

/// FNV-1a, 64 bits: tiny, and stable across Rust releases (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn base36(mut value: u64, len: usize) -> String {
    (0..len)
        .map(|_| {
            let digit = BASE36[(value % 36) as usize];
            value /= 36;
            char::from(digit)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit_and_stay_stable() {
        let tag = instance_tag(Path::new("/srv/poseidon/data"));
        assert_eq!(tag.len(), MAX_TAG_LEN);
        validate_tag(&tag).expect("a generated tag is valid");
        assert_eq!(tag, instance_tag(Path::new("/srv/poseidon/data")));
        assert_ne!(tag, instance_tag(Path::new("/srv/poseidon/data2")));
        for tag in ["a", "abcdef"] {
            let name = veth(tag, "29-ab70831e-89b2-11ef-9212-fa163eb9b043", 0);
            assert_eq!(name.len(), IFNAME_MAX, "{name}");
            assert!(name.starts_with(&veth_prefix(tag)));
        }
        assert_ne!(veth("a", "r", 0), veth("a", "r", 1));
        assert_eq!(veth("a", "r", 0), veth("a", "r", 0));
    }

    #[test]
    fn prefixes_of_different_tags_do_not_match_each_other() {
        assert!(!veth("abc", "r", 0).starts_with(&veth_prefix("ab")));
    }

    #[test]
    fn invalid_tags_are_rejected() {
        for tag in ["", "abcdefg", "ABC", "a-b", "a b"] {
            assert!(validate_tag(tag).is_err(), "{tag:?}");
        }
    }
}
