//! File operations through exec, with the local backend's semantics: copies are a tar archive
//! streamed into `tar --extract` (files 0744, directories 01777, owned by root), listings are
//! `find -printf` records parsed into [`FileHeader`]s, failures are read from tar's messages.

use runner_core::{FileCopy, FileFailure, FileHeader};

/// Longest path accepted.
pub const MAX_PATH_LEN: usize = 4096;

/// `path.Clean` of Go, keeping a relative path relative (`a/../b` → `b`, `/x/../y` → `/y`).
pub fn clean(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// The member name a copy is written under: the path resolved against `workdir` (as the local
/// backend resolves it), relative to `/` (the archive is extracted there), directories with
/// their trailing slash.
pub fn member_name(workdir: &str, path: &str) -> String {
    let absolute = if path.starts_with('/') {
        clean(path)
    } else {
        clean(&format!("{workdir}/{path}"))
    };
    let relative = absolute.trim_start_matches('/');
    let relative = if relative.is_empty() { "." } else { relative };
    if path.ends_with('/') {
        format!("{relative}/")
    } else {
        relative.to_string()
    }
}

/// Builds the tar archive of `copies`: regular files 0744 and directories (paths ending in
/// `/`) 01777, owned by uid/gid 0.
pub fn archive(workdir: &str, copies: &[FileCopy]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for c in copies {
        let name = member_name(workdir, &c.path);
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        if c.path.ends_with('/') {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o1777);
            header.set_size(0);
            builder.append_data(&mut header, &name, std::io::empty())?;
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o744);
            header.set_size(c.content.len() as u64);
            builder.append_data(&mut header, &name, &c.content[..])?;
        }
    }
    builder.into_inner()
}

/// The copies tar reported as failed, from its stderr (`tar: <member>: <reason>`).
pub fn failures(workdir: &str, copies: &[FileCopy], tar_stderr: &str) -> Vec<FileFailure> {
    let mut out = Vec::new();
    for c in copies {
        let name = member_name(workdir, &c.path);
        let trimmed = name.trim_end_matches('/');
        let reason = tar_stderr.lines().find_map(|l| {
            let rest = l.strip_prefix("tar: ")?;
            [name.as_str(), trimmed]
                .iter()
                .find_map(|n| rest.strip_prefix(n)?.strip_prefix(": "))
                .map(str::to_string)
        });
        if let Some(reason) = reason {
            out.push(FileFailure {
                path: c.path.clone(),
                reason,
            });
        }
    }
    out
}

/// Parses the `find -printf` records of [`crate::command::list`] for the client path `path`.
/// The last record is the start point itself: a directory's entries are named
/// `<path>/<relative>`, a file is named as the client gave it.
pub fn parse_listing(path: &str, output: &[u8]) -> Vec<FileHeader> {
    let fields: Vec<&[u8]> = output.split(|b| *b == 0).collect();
    let mut records: Vec<FileHeader> = Vec::new();
    let mut start: Option<FileHeader> = None;
    let prefix = if path.ends_with('/') || path.is_empty() {
        path.to_string()
    } else {
        format!("{path}/")
    };
    for record in fields.chunks(8) {
        if record.len() < 8 {
            break;
        }
        let text = |i: usize| String::from_utf8_lossy(record[i]).into_owned();
        let kind = match text(0).as_str() {
            "f" => '-',
            "d" => 'd',
            "l" => 'l',
            "c" => 'c',
            "b" => 'b',
            "p" => 'p',
            "s" => 's',
            _ => '?',
        };
        let mode = text(3);
        let relative = text(7);
        let link = text(6);
        let header = FileHeader {
            name: String::new(),
            entry_type: kind,
            link_target: (kind == 'l' && !link.is_empty()).then_some(link),
            size: text(1).parse().unwrap_or(0),
            modification_time: text(2)
                .split('.')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            permissions: mode.chars().skip(1).collect(),
            owner: text(4),
            group: text(5),
        };
        if relative.is_empty() {
            start = Some(header);
        } else {
            records.push(FileHeader {
                name: format!("{prefix}{relative}"),
                ..header
            });
        }
    }
    match start {
        Some(s) if s.entry_type != 'd' => vec![FileHeader {
            name: path.to_string(),
            ..s
        }],
        _ => {
            records.sort_by(|a, b| a.name.cmp(&b.name));
            records
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn copy(path: &str, content: &'static str) -> FileCopy {
        FileCopy {
            path: path.into(),
            content: Bytes::from_static(content.as_bytes()),
        }
    }

    #[test]
    fn paths_are_cleaned_like_go_keeping_relative_ones_relative() {
        assert_eq!(clean("a/./b//c"), "a/b/c");
        assert_eq!(clean("a/../../b"), "../b");
        assert_eq!(clean("/x/../../y"), "/y");
        assert_eq!(clean("./"), ".");
        assert_eq!(member_name("/workspace", "kit/sub/"), "workspace/kit/sub/");
        assert_eq!(member_name("/workspace", "../etc/x"), "etc/x");
        assert_eq!(member_name("/workspace", "/tmp/./y"), "tmp/y");
    }

    #[test]
    fn the_archive_holds_root_owned_files_0744_and_dirs_01777() {
        let data = archive(
            "/workspace",
            &[
                copy("kit/a.txt", "alpha"),
                copy("kit/d/", ""),
                copy("/tmp/x", "x"),
            ],
        )
        .unwrap();
        let mut a = tar::Archive::new(&data[..]);
        let entries: Vec<(String, u32, u64, u64)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.size().unwrap(),
                )
            })
            .collect();
        assert_eq!(entries[0], ("workspace/kit/a.txt".into(), 0o744, 0, 5));
        assert_eq!(entries[1], ("workspace/kit/d/".into(), 0o1777, 0, 0));
        assert_eq!(entries[2].0, "tmp/x");
    }

    #[test]
    fn tar_messages_name_the_failed_copies() {
        let copies = [copy("/proc/1/environ", "x"), copy("kit/ok.txt", "ok")];
        let stderr = "tar: proc/1/environ: Cannot open: Permission denied\n\
                      tar: Exiting with failure status due to previous errors\n";
        assert_eq!(
            failures("/workspace", &copies, stderr),
            vec![FileFailure {
                path: "/proc/1/environ".into(),
                reason: "Cannot open: Permission denied".into()
            }]
        );
    }

    #[test]
    fn find_records_become_headers() {
        let out = b"f\x005\x001700000000.5\x00-rwxr--r--\x00root\x00root\x00\x00a.txt\x00\
d\x004096\x001700000001.0\x00drwxrwxrwt\x00root\x00root\x00\x00sub\x00\
l\x001\x001700000002.0\x00lrwxrwxrwx\x00user\x00user\x00a.txt\x00ln\x00\
d\x004096\x001700000003.0\x00drwxr-xr-x\x00root\x00root\x00\x00\x00";
        let list = parse_listing("kit", out);
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].name, "kit/a.txt");
        assert_eq!(list[0].permissions, "rwxr--r--");
        assert_eq!(list[0].modification_time, 1_700_000_000);
        assert_eq!(list[0].entry_type, '-');
        assert_eq!(list[1].name, "kit/ln");
        assert_eq!(list[1].link_target.as_deref(), Some("a.txt"));
        assert_eq!(list[2].name, "kit/sub");
        assert_eq!(list[2].permissions, "rwxrwxrwt");
        let file = b"f\x005\x001700000000\x00-rw-r--r--\x00root\x00root\x00\x00\x00";
        let list = parse_listing("kit/a.txt", file);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "kit/a.txt");
    }
}
