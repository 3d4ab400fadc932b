//! A process's footprint as the soak scenario watches it: resident memory, open file
//! descriptors and descendant processes, read from `/proc`, and when a footprint counts as flat.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;

/// Open fds the end sample may exceed the start sample by and still count as flat: room for a
/// few connections or pipes in flight when the sample is taken, never for one fd per execution.
pub const FD_SLACK: u64 = 8;
/// Growth factor of RSS from start to end that still counts as flat (allocator arenas and
/// caches settling), applied before [`RSS_SLACK_KIB`].
pub const RSS_FACTOR: f64 = 1.25;
/// RSS growth (KiB) on top of [`RSS_FACTOR`] that still counts as flat: 8 MiB.
pub const RSS_SLACK_KIB: u64 = 8 * 1024;

/// One sample of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// `VmRSS` from `/proc/<pid>/status`, KiB.
    pub rss_kib: u64,
    /// Entries of `/proc/<pid>/fd`.
    pub fds: u64,
    /// Processes descending from it (children, grandchildren, … including zombies): the
    /// sandboxes' inits and whatever they leave behind.
    pub procs: u64,
}

impl Sample {
    /// Samples process `pid`; an error when it is gone or `/proc` cannot be read.
    pub fn of(pid: u32) -> io::Result<Self> {
        let proc_dir = Path::new("/proc").join(pid.to_string());
        let status = std::fs::read_to_string(proc_dir.join("status"))?;
        let rss_kib = vm_rss_kib(&status).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "no VmRSS in /proc/<pid>/status")
        })?;
        let fds = std::fs::read_dir(proc_dir.join("fd"))?.count() as u64;
        Ok(Self {
            rss_kib,
            fds,
            procs: descendants(pid),
        })
    }
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rss {} KiB, fds {}, procs {}",
            self.rss_kib, self.fds, self.procs
        )
    }
}

/// The `VmRSS:` value of a `/proc/<pid>/status` text, KiB.
fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The parent pid in a `/proc/<pid>/stat` line: the second field after the command, which is
/// in parentheses and may itself hold spaces or parentheses.
fn parent_of(stat: &str) -> Option<u32> {
    let (_, after_command) = stat.rsplit_once(')')?;
    after_command.split_whitespace().nth(1)?.parse().ok()
}

/// How many processes descend from `pid`, from one scan of `/proc` (processes that appear or
/// go during the scan may be missed).
fn descendants(pid: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(parent) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(parent_of)
        {
            children.entry(parent).or_default().push(child);
        }
    }
    let mut count = 0;
    let mut pending = vec![pid];
    while let Some(p) = pending.pop() {
        if let Some(kids) = children.get(&p) {
            count += kids.len() as u64;
            pending.extend(kids);
        }
    }
    count
}

/// The server's footprint after the soak's warm-up and at its end, both taken with no
/// execution in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// RSS after the warm-up, KiB.
    pub rss_start_kib: u64,
    /// RSS at the end, KiB.
    pub rss_end_kib: u64,
    /// Open fds after the warm-up.
    pub fds_start: u64,
    /// Open fds at the end.
    pub fds_end: u64,
    /// Descendant processes after the warm-up (informational, not part of [`Self::is_flat`]).
    pub procs_start: u64,
    /// Descendant processes at the end (informational).
    pub procs_end: u64,
}

impl Footprint {
    /// The footprint from the `start` and `end` samples.
    pub fn between(start: Sample, end: Sample) -> Self {
        Self {
            rss_start_kib: start.rss_kib,
            rss_end_kib: end.rss_kib,
            fds_start: start.fds,
            fds_end: end.fds,
            procs_start: start.procs,
            procs_end: end.procs,
        }
    }

    /// Flat: end fds ≤ start fds + [`FD_SLACK`] and end RSS ≤ start RSS × [`RSS_FACTOR`] +
    /// [`RSS_SLACK_KIB`]. A leak of one fd or a few hundred bytes per execution over 100 000
    /// executions breaks either bound; the slack only absorbs noise.
    pub fn is_flat(&self) -> bool {
        let rss_bound = self.rss_start_kib as f64 * RSS_FACTOR + RSS_SLACK_KIB as f64;
        self.fds_end <= self.fds_start + FD_SLACK && self.rss_end_kib as f64 <= rss_bound
    }
}

impl fmt::Display for Footprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rss start/end {}/{} KiB, fds start/end {}/{}, procs start/end {}/{}",
            self.rss_start_kib,
            self.rss_end_kib,
            self.fds_start,
            self.fds_end,
            self.procs_start,
            self.procs_end
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_from_the_status_text() {
        let status = "Name:\tposeidon\nVmPeak:\t  99 kB\nVmRSS:\t   43212 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_kib(status), Some(43_212));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn the_parent_is_found_after_a_command_with_spaces_and_parentheses() {
        assert_eq!(parent_of("42 (a b) c) S 17 42 42 0"), Some(17));
        assert_eq!(parent_of("42 (sh) R 1 42"), Some(1));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn this_process_samples_itself_and_counts_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let sample = Sample::of(std::process::id());
        child.kill().unwrap();
        child.wait().unwrap();
        let sample = sample.unwrap();
        assert!(sample.rss_kib > 0);
        assert!(sample.fds >= 3, "{sample}");
        assert!(sample.procs >= 1, "{sample}");
    }
}
