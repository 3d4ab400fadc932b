//! What the server prepares on the host for runners' root filesystems: the generated `/etc`
//! used under the host allow-list, and the sandbox's own `passwd`/`group`.
//!
//! The host's `/etc` is copied by an allow rule, never a deny rule over a bind: only entries
//! readable by everyone are copied (so `shadow`, `gshadow`, private host keys, `sudoers` and
//! the like never appear), and a few world-readable identity files are left out explicitly.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, fchownat};

use crate::sandbox::USER_ID;

/// The host directories a runner without an image sees (read-only, ID-mapped).
pub const HOST_ALLOW_LIST: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt",
];

/// Entries of the host's `/etc` never copied even when world-readable.
const ETC_EXCLUDED: &[&str] = &[
    "passwd",
    "passwd-",
    "group",
    "group-",
    "shadow",
    "shadow-",
    "gshadow",
    "gshadow-",
    "subuid",
    "subgid",
    "machine-id",
    "hostname",
    "hosts",
    "ssh",
    "ssl/private",
    "sudoers",
    "sudoers.d",
];

/// The sandbox's `/etc/passwd`: `root`, `user` (1000, home `/home/user`) and `nobody`.
pub fn passwd() -> String {
    format!(
        "root:x:0:0:root:/root:/bin/bash\n\
         user:x:{USER_ID}:{USER_ID}:user:/home/user:/bin/bash\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
}

/// The sandbox's `/etc/group`.
pub fn group() -> String {
    format!("root:x:0:\ntty:x:5:\nuser:x:{USER_ID}:\nnogroup:x:65534:\n")
}

/// Builds `<dest>` (atomically, through a temporary sibling) as a filtered copy of `/etc` owned
/// by `owner` (the host uid of the sandbox's root) with the generated identity files. Returns
/// early when it already exists.
pub fn build_etc(host_etc: &Path, dest: &Path, owner: u32) -> io::Result<()> {
    if dest.exists() {
        return Ok(());
    }
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    copy_tree(host_etc, &tmp, "", owner)?;
    for (name, text) in [
        ("passwd", passwd()),
        ("group", group()),
        ("hostname", "runner\n".to_string()),
        (
            "hosts",
            "127.0.0.1\tlocalhost runner\n::1\tlocalhost\n".to_string(),
        ),
    ] {
        let p = tmp.join(name);
        fs::write(&p, text)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
        own(&p, owner)?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    own(&tmp, owner)?;
    fs::rename(&tmp, dest)
}

fn own(path: &Path, owner: u32) -> io::Result<()> {
    fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(Uid::from_raw(owner)),
        Some(Gid::from_raw(owner)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
}

fn copy_tree(src: &Path, dst: &Path, rel: &str, owner: u32) -> io::Result<()> {
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let rel_name = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if ETC_EXCLUDED.contains(&rel_name.as_str()) {
            continue;
        }
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        let target: PathBuf = dst.join(&name);
        let mode = meta.mode();
        if meta.file_type().is_symlink() {
            symlink(fs::read_link(&path)?, &target)?;
        } else if meta.is_dir() {
            if mode & 0o005 != 0o005 {
                continue;
            }
            fs::create_dir(&target)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(mode & 0o7777))?;
            copy_tree(&path, &target, &rel_name, owner)?;
        } else if meta.is_file() {
            if mode & 0o004 == 0 {
                continue;
            }
            if fs::copy(&path, &target).is_err() {
                continue;
            }
            fs::set_permissions(&target, fs::Permissions::from_mode(mode & 0o777))?;
        } else {
            continue;
        }
        own(&target, owner)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_etc_keeps_only_world_readable_entries_and_owns_them() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::write(s.join("os-release"), "ID=test\n").unwrap();
        fs::write(s.join("shadow"), "root:secret\n").unwrap();
        fs::write(s.join("secret.conf"), "x").unwrap();
        fs::set_permissions(s.join("secret.conf"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir(s.join("ssh")).unwrap();
        fs::write(s.join("ssh/ssh_host_ed25519_key.pub"), "pub").unwrap();
        fs::create_dir(s.join("conf.d")).unwrap();
        fs::write(s.join("conf.d/a"), "a").unwrap();
        symlink("os-release", s.join("link")).unwrap();
        let dest = out.path().join("etc");
        build_etc(s, &dest, 123_456).unwrap();
        assert!(dest.join("os-release").exists());
        assert!(dest.join("conf.d/a").exists());
        assert!(!dest.join("shadow").exists());
        assert!(!dest.join("secret.conf").exists());
        assert!(!dest.join("ssh").exists());
        assert_eq!(
            fs::read_link(dest.join("link")).unwrap(),
            Path::new("os-release")
        );
        assert!(
            fs::read_to_string(dest.join("passwd"))
                .unwrap()
                .contains("user:x:1000:1000")
        );
        assert_eq!(
            fs::metadata(dest.join("os-release")).unwrap().uid(),
            123_456
        );
        assert_eq!(
            fs::symlink_metadata(dest.join("link")).unwrap().uid(),
            123_456
        );
    }
}
