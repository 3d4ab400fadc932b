//! File operations, run in a child of the init inside the runner's root with the request's
//! credentials. Because they run inside the runner's mount namespace and root, a symlink or `..`
//! planted by user code resolves inside the runner and can never reach the host.
//!
//! The helper is a fork of the server's binary, so its own `/proc/<pid>` describes the host
//! (`exe` is the server binary, `maps` names host paths). Paths are therefore opened with
//! `RESOLVE_NO_MAGICLINKS` (no `/proc/*/exe`, `fd/*`, `map_files/*`, `cwd`, `root` on the way)
//! and anything inside the helper's own `/proc/<pid>` is answered as not found; listings walk
//! directories by descriptor, so a directory swapped for a symlink cannot lead there either.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use std::os::fd::{BorrowedFd, OwnedFd};

use nix::unistd::{Gid, Uid};

use crate::protocol::{CopyHeader, Entry, Failure, Response, write_msg};

/// The working directory relative paths are resolved against.
pub(crate) const WORKSPACE: &str = "/workspace";

/// How much file content the helper reads from its connection at once.
const CONTENT_BUFFER: usize = 64 << 10;

/// Largest listing returned (entries), so a huge tree cannot exhaust memory.
const MAX_ENTRIES: usize = 100_000;

/// Largest listing returned (bytes of names and link targets), so long names cannot exhaust the
/// server's memory either: JSON escaping may grow them sixfold, which stays under
/// `protocol::MAX_RESPONSE`.
const MAX_LISTING_BYTES: usize = 8 << 20;

/// Serves one file operation on `conn` and exits. `userns` is the execution namespace, entered
/// with the request's credentials (an update is privileged, as in Poseidon).
pub(crate) fn serve(
    mut conn: UnixStream,
    request: crate::protocol::Request,
    userns: BorrowedFd<'_>,
) -> ! {
    use crate::protocol::Request;
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let privileged = match &request {
        Request::List { privileged, .. } | Request::Read { privileged, .. } => *privileged,
        _ => true,
    };
    let response = match super::setup::enter_execution_namespace(userns, privileged) {
        Err(message) => Response::Error { message },
        Ok(()) => {
            // The helper touches little memory, most of it its own from here on: small pages
            // keep each first touch cheap (a transparent huge page is 2 MiB to zero).
            let _ = rustix::thread::disable_transparent_huge_pages(true);
            // As for a command: `/proc/self/cwd` and relative lookups see the working directory.
            let _ = nix::unistd::chdir(WORKSPACE);
            match request {
                Request::Update { delete, copies } => update(&mut conn, &delete, &copies),
                Request::List {
                    path, recursive, ..
                } => list(&path, recursive),
                Request::Read { path, .. } => read(&mut conn, &path),
                Request::Ping | Request::Exec { .. } | Request::Spawn { .. } => Response::Error {
                    message: "not a file operation".into(),
                },
            }
        }
    };
    let _ = write_msg(&mut conn, &response);
    // Nothing is buffered and nothing needs dropping: end without the runtime's cleanup.
    super::init::exit_helper()
}

/// `path.Clean` of Go, on an absolute path: `.`, `..` and repeated slashes resolved lexically.
pub(crate) fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A client path made absolute: relative paths are under [`WORKSPACE`].
pub(crate) fn resolve(path: &str) -> String {
    if path.starts_with('/') {
        clean(path)
    } else {
        clean(&format!("{WORKSPACE}/{path}"))
    }
}

/// Opens `path` (absolute, inside the runner's root) without crossing a `/proc` magic link;
/// `None` when it cannot be opened or lies in this helper's own `/proc/<pid>`.
fn open_safely(path: &str, flags: rustix::fs::OFlags) -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let fd = rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_MAGICLINKS,
    )
    .ok()?;
    (!is_own_proc(&fd)).then_some(fd)
}

/// Whether `fd` is in procfs under this process's own `/proc/<pid>` (reached as `/proc/self`,
/// `/proc/thread-self` or by number).
fn is_own_proc(fd: &OwnedFd) -> bool {
    match rustix::fs::fstatfs(fd) {
        Ok(fs) if fs.f_type == rustix::fs::PROC_SUPER_MAGIC => {}
        Ok(_) => return false,
        Err(_) => return true,
    }
    let Ok(target) = fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(fd)
    )) else {
        return true;
    };
    let own = format!("/proc/{}", std::process::id());
    let target = target.to_string_lossy();
    target == own || target.starts_with(&format!("{own}/"))
}

fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

fn update(conn: &mut UnixStream, delete: &[String], copies: &[CopyHeader]) -> Response {
    for d in delete {
        if d == "./*" {
            // Poseidon runs `rm -rf ./*` in the workspace: the glob leaves dotfiles alone.
            if let Ok(rd) = fs::read_dir(WORKSPACE) {
                for e in rd.flatten() {
                    if !e.file_name().as_encoded_bytes().starts_with(b".") {
                        remove(&e.path());
                    }
                }
            }
        } else {
            remove(Path::new(&resolve(d)));
        }
    }
    let mut failures = Vec::new();
    // The contents arrive back to back: one read fetches many small files.
    let mut content = io::BufReader::with_capacity(CONTENT_BUFFER, &*conn);
    // The parent directory of the previous copy: a batch of files in one directory creates (or
    // checks) it once.
    let mut parent: Option<Parent> = None;
    for c in copies {
        // Content streams from the connection into the file: a file as big as the runner's
        // memory must not be held in it. A failed file's remaining bytes are read and dropped.
        let (mut file, mut failure, settled) = match open_target(&c.path, &mut parent) {
            Ok(Some(target)) => (Some(target.file), None, target.settled),
            Ok(None) => (None, None, true),
            Err(reason) => (None, Some(reason), true),
        };
        let mut left = c.len;
        while left > 0 {
            let chunk = match content.fill_buf() {
                Ok([]) => {
                    return Response::Error {
                        message: "file content ended early".into(),
                    };
                }
                Ok(chunk) => chunk,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Response::Error {
                        message: format!("reading file content: {e}"),
                    };
                }
            };
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
            if let Some(f) = file.as_mut()
                && let Err(e) = f.write_all(&chunk[..n])
            {
                failure = Some(format!("Cannot write: {}", errno_text(&e)));
                file = None;
                // A truncated file would only hold on to the space the other files need.
                let _ = fs::remove_file(resolve(&c.path));
            }
            content.consume(n);
            left -= n as u64;
        }
        if let Some(f) = file.filter(|_| !settled) {
            // The file is written; a mode or owner it did not get is still reported, so the
            // client does not take a file it cannot use for a good one.
            if let Err(e) = f.set_permissions(fs::Permissions::from_mode(0o744)) {
                failure.get_or_insert(format!("Cannot set its mode: {}", errno_text(&e)));
            }
            if let Err(e) = nix::unistd::fchown(&f, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
            {
                failure.get_or_insert(format!("Cannot set its owner: {e}"));
            }
        }
        if let Some(reason) = failure {
            failures.push(Failure {
                path: c.path.clone(),
                reason,
            });
        }
    }
    Response::Updated { failures }
}

fn remove(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

fn create_parents(path: &Path) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| format!("Cannot mkdir: {}", errno_text(&e)))?;
    }
    Ok(())
}

/// A file to write the content of a copy to.
struct Target {
    file: fs::File,
    /// The file was created with its final mode (0744) and owner (root), so neither needs
    /// setting.
    settled: bool,
}

/// The parent directory of the latest copy target, made sure of (created) once for all the
/// copies into it.
struct Parent {
    path: PathBuf,
    /// The directory, open when new files in it get their final mode and owner on creation: it
    /// is not on procfs, not set-group-ID (a new file would take its group) and has no default
    /// ACL (which would replace the mode). A descriptor of a directory inside the runner, found
    /// the way the target path itself is: it reaches nothing the paths do not.
    plain: Option<OwnedFd>,
}

impl Parent {
    fn made_sure_of(path: &Path) -> Parent {
        Parent {
            path: path.to_path_buf(),
            plain: plain_directory(path),
        }
    }
}

/// `path` opened when files created in it come out as [`Parent::plain`] describes.
fn plain_directory(path: &Path) -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let dir = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    if rustix::fs::fstatfs(&dir).ok()?.f_type == rustix::fs::PROC_SUPER_MAGIC
        || rustix::fs::fstat(&dir).ok()?.st_mode & libc::S_ISGID != 0
    {
        return None;
    }
    match rustix::fs::fgetxattr_query(&dir, "system.posix_acl_default") {
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::OPNOTSUPP) => Some(dir),
        Ok(_) | Err(_) => None,
    }
}

/// Prepares one copy target: creates its parent directories (unless `parent` already holds
/// them, made sure of for an earlier copy of the same update), then either the directory itself
/// (a path ending in `/`; no file to write) or an empty root-owned file to write the content to.
/// `parent` becomes this target's parent.
fn open_target(client_path: &str, parent: &mut Option<Parent>) -> Result<Option<Target>, String> {
    use rustix::fs::{Mode, OFlags};
    let is_dir = client_path.ends_with('/');
    let path = PathBuf::from(resolve(client_path));
    if path.parent() != parent.as_ref().map(|p| p.path.as_path()) {
        *parent = None;
        create_parents(&path)?;
        *parent = path.parent().map(Parent::made_sure_of);
    }
    if is_dir {
        match fs::DirBuilder::new().mode(0o1777).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(e) => return Err(format!("Cannot mkdir: {}", errno_text(&e))),
        }
        return fs::set_permissions(&path, fs::Permissions::from_mode(0o1777))
            .map(|()| None)
            .map_err(|e| format!("Cannot change mode: {}", errno_text(&e)));
    }
    // A new file in a plain directory: created as it must end up, relative to the open
    // directory. A name that exists already takes the path-based way below.
    if let (Some(dir), Some(name)) = (
        parent.as_ref().and_then(|p| p.plain.as_ref()),
        path.file_name(),
    ) {
        match rustix::fs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o744),
        ) {
            Ok(fd) => {
                return Ok(Some(Target {
                    file: fs::File::from(fd),
                    settled: true,
                }));
            }
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(format!("Cannot open: {}", errno_text(&e.into()))),
        }
    }
    let open_new = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o744)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
    };
    let file = match open_new() {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if fs::symlink_metadata(&path)
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                return Err("Cannot open: Is a directory".into());
            }
            match fs::remove_file(&path).and_then(|()| open_new()) {
                Ok(f) => f,
                Err(_) => fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|e| format!("Cannot open: {}", errno_text(&e)))?,
            }
        }
        Err(e) => return Err(format!("Cannot open: {}", errno_text(&e))),
    };
    // Nothing of the helper's own process (or any other's) is written through the file API.
    if rustix::fs::fstatfs(&file).map_or(true, |fs| fs.f_type == rustix::fs::PROC_SUPER_MAGIC) {
        return Err("Cannot open: Operation not permitted".into());
    }
    Ok(Some(Target {
        file,
        settled: false,
    }))
}

fn names(file: &str) -> HashMap<u32, String> {
    let text = super::setup::read_small(Path::new(file));
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            Some((id, name.to_string()))
        })
        .collect()
}

/// `ls -l` permission bits of `mode`, e.g. `rwxr--r--` or `rwxrwxrwt`.
pub(crate) fn permissions(mode: u32) -> String {
    let bit = |m: u32, c: char| if mode & m != 0 { c } else { '-' };
    let exec = |x: u32, special: u32, set: char| match (mode & x != 0, mode & special != 0) {
        (true, true) => set,
        (false, true) => set.to_ascii_uppercase(),
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        exec(0o100, 0o4000, 's'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        exec(0o010, 0o2000, 's'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        exec(0o001, 0o1000, 't'),
    ]
    .iter()
    .collect()
}

fn entry_type(mode: u32) -> char {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '-',
    }
}

struct Lister {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
    entries: Vec<Entry>,
    bytes: usize,
}

/// The `ls -l` facts of one file, from its `stat` and (for a link) its target.
struct Facts {
    mode: u32,
    size: u64,
    mtime: i64,
    uid: u32,
    gid: u32,
    link_target: Option<String>,
}

impl Facts {
    /// `name` in the directory `dir`, not following a final symlink.
    fn at(dir: &OwnedFd, name: &str) -> Option<Facts> {
        let st = rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).ok()?;
        let mut facts = Facts::from_stat(&st);
        if entry_type(facts.mode) == 'l' {
            facts.link_target = rustix::fs::readlinkat(dir, name, Vec::new())
                .ok()
                .map(|t| t.to_string_lossy().into_owned());
        }
        Some(facts)
    }

    fn from_stat(st: &rustix::fs::Stat) -> Facts {
        Facts {
            mode: st.st_mode,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: st.st_mtime,
            uid: st.st_uid,
            gid: st.st_gid,
            link_target: None,
        }
    }
}

impl Lister {
    fn entry(&self, name: String, facts: Facts) -> Entry {
        let id_name = |map: &HashMap<u32, String>, id: u32| {
            map.get(&id).cloned().unwrap_or_else(|| id.to_string())
        };
        Entry {
            name,
            entry_type: entry_type(facts.mode),
            link_target: facts.link_target,
            size: facts.size,
            modification_time: facts.mtime,
            permissions: permissions(facts.mode),
            owner: id_name(&self.users, facts.uid),
            group: id_name(&self.groups, facts.gid),
        }
    }

    /// Lists the open directory `dir`, descending through real subdirectories only (opened
    /// relative to it, never through a symlink or a magic link).
    fn dir(&mut self, dir: OwnedFd, prefix: &str, recursive: bool) -> io::Result<()> {
        use rustix::fs::{OFlags, ResolveFlags};
        let mut names: Vec<String> = rustix::fs::Dir::read_from(&dir)?
            .flatten()
            .filter_map(|e| e.file_name().to_str().ok().map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let mut subdirs = Vec::new();
        for n in names {
            if self.entries.len() >= MAX_ENTRIES || self.bytes >= MAX_LISTING_BYTES {
                break;
            }
            let Some(facts) = Facts::at(&dir, &n) else {
                continue;
            };
            if entry_type(facts.mode) == 'd' {
                subdirs.push(n.clone());
            }
            let e = self.entry(format!("{prefix}{n}"), facts);
            self.bytes += 64 + e.name.len() + e.link_target.as_ref().map_or(0, String::len);
            self.entries.push(e);
        }
        if recursive {
            for n in subdirs {
                let Ok(sub) = rustix::fs::openat2(
                    &dir,
                    n.as_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                    ResolveFlags::NO_MAGICLINKS | ResolveFlags::BENEATH,
                ) else {
                    continue;
                };
                if is_own_proc(&sub) {
                    continue;
                }
                let _ = self.dir(sub, &format!("{prefix}{n}/"), true);
            }
        }
        Ok(())
    }
}

fn list(client_path: &str, recursive: bool) -> Response {
    use rustix::fs::OFlags;
    let path = resolve(client_path);
    let follow = client_path.ends_with('/') || client_path.is_empty();
    let flags = if follow {
        OFlags::PATH
    } else {
        OFlags::PATH | OFlags::NOFOLLOW
    };
    let Some(target) = open_safely(&path, flags) else {
        return Response::NotFound;
    };
    let Ok(st) = rustix::fs::fstat(&target) else {
        return Response::NotFound;
    };
    let mut lister = Lister {
        users: names("/etc/passwd"),
        groups: names("/etc/group"),
        entries: Vec::new(),
        bytes: 0,
    };
    if entry_type(st.st_mode) == 'd' {
        let prefix = if client_path.ends_with('/') || client_path.is_empty() {
            client_path.to_string()
        } else {
            format!("{client_path}/")
        };
        // Reopened through the descriptor already checked, so the listed directory is that one.
        let Ok(dir) = rustix::fs::openat(
            &target,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) else {
            return Response::NotFound;
        };
        if lister.dir(dir, &prefix, recursive).is_err() {
            return Response::NotFound;
        }
    } else {
        let mut facts = Facts::from_stat(&st);
        if entry_type(facts.mode) == 'l' {
            facts.link_target = rustix::fs::readlinkat(&target, "", Vec::new())
                .ok()
                .map(|t| t.to_string_lossy().into_owned());
        }
        let e = lister.entry(client_path.to_string(), facts);
        lister.entries.push(e);
    }
    Response::Listing {
        entries: lister.entries,
    }
}

/// Largest file without a size (e.g. in `/proc`) that is read whole and sent.
const MAX_UNSIZED_FILE: u64 = 1 << 20;

/// Sends a regular file. Anything else (directories, FIFOs, devices, sockets) is not a file to
/// download: opening a FIFO would wait for a writer and a device may never end.
fn read(conn: &mut UnixStream, client_path: &str) -> Response {
    use rustix::fs::OFlags;
    let path = resolve(client_path);
    let Some(file) = open_safely(&path, OFlags::RDONLY | OFlags::NONBLOCK) else {
        return Response::NotFound;
    };
    let file = fs::File::from(file);
    let Ok(meta) = file.metadata() else {
        return Response::NotFound;
    };
    if !meta.is_file() {
        return Response::NotFound;
    }
    if meta.len() > 0 {
        if write_msg(conn, &Response::File { size: meta.len() }).is_err() {
            super::init::exit_helper();
        }
        let _ = io::copy(&mut file.take(meta.len()), conn);
    } else {
        // Size 0 may be an empty file or a generated one such as /proc/self/status.
        let mut content = Vec::new();
        if file
            .take(MAX_UNSIZED_FILE)
            .read_to_end(&mut content)
            .is_err()
        {
            return Response::NotFound;
        }
        if write_msg(
            conn,
            &Response::File {
                size: content.len() as u64,
            },
        )
        .is_ok()
        {
            let _ = conn.write_all(&content);
        }
    }
    super::init::exit_helper()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_like_go_and_relative_ones_land_in_the_workspace() {
        assert_eq!(resolve("a.txt"), "/workspace/a.txt");
        assert_eq!(resolve("./"), "/workspace");
        assert_eq!(resolve("../../etc/passwd"), "/etc/passwd");
        assert_eq!(resolve("/tmp//x/./y/../z"), "/tmp/x/z");
        assert_eq!(clean("/.."), "/");
    }

    #[test]
    fn permissions_render_like_ls() {
        assert_eq!(permissions(0o744), "rwxr--r--");
        assert_eq!(permissions(0o1777), "rwxrwxrwt");
        assert_eq!(permissions(0o1776), "rwxrwxrwT");
        assert_eq!(permissions(0o4755), "rwsr-xr-x");
        assert_eq!(permissions(0o2644), "rw-r-Sr--");
    }
}
