//! Injected faults (nomad.md §5.9): counted request faults, start failures, holds, exec faults.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::ExecFault;

/// How many times a fault fires; [`Times::ALWAYS`] never runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Times(pub u32);

impl Times {
    /// A fault that fires on every match.
    pub const ALWAYS: Times = Times(u32::MAX);
    /// A fault that fires once.
    pub const ONCE: Times = Times(1);
}

/// Which requests a fault applies to: an optional method and a path glob, where `*` matches
/// any run of characters except `/` and a trailing `/**` matches any rest of the path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Match {
    /// The HTTP method (`PUT`, …), any when `None`.
    #[serde(default)]
    pub method: Option<String>,
    /// The path glob, e.g. `/v1/job/*/allocations`.
    pub path: String,
}

impl Match {
    /// Every request.
    pub fn any() -> Self {
        Self {
            method: None,
            path: "/**".into(),
        }
    }

    /// Requests whose path matches `glob`, any method.
    pub fn path(glob: impl Into<String>) -> Self {
        Self {
            method: None,
            path: glob.into(),
        }
    }

    /// Restricts the match to `method`.
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.method = Some(method.into());
        self
    }

    /// Whether a request with `method` and `path` matches.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.method
            .as_ref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && glob_match(&self.path, path)
    }
}

fn glob_match(pattern: &str, path: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix("/**") {
        return glob_match(prefix, path)
            || path
                .char_indices()
                .filter(|(_, c)| *c == '/')
                .any(|(i, _)| glob_match(prefix, &path[..i]));
    }
    let p: Vec<&str> = pattern.split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    p.len() == s.len() && p.iter().zip(&s).all(|(p, s)| segment_match(p, s))
}

fn segment_match(p: &str, s: &str) -> bool {
    match p.find('*') {
        None => p == s,
        Some(i) => {
            let (head, tail) = (&p[..i], &p[i + 1..]);
            if !s.starts_with(head) {
                return false;
            }
            let rest = &s[head.len()..];
            (0..=rest.len())
                .filter(|j| rest.is_char_boundary(*j))
                .any(|j| segment_match(tail, &rest[j..]))
        }
    }
}

/// What a request fault does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestFault {
    /// Answer with this status and plain-text body instead of handling the request.
    Fail {
        /// HTTP status.
        status: u16,
        /// Body text.
        message: String,
    },
    /// Handle the request after this delay.
    Delay(Duration),
    /// Close the connection without an answer (TCP reset).
    Drop,
}

#[derive(Debug, Clone)]
struct Counted<T> {
    what: T,
    remaining: u32,
}

fn take<T: Clone>(rules: &mut Vec<Counted<T>>, pred: impl Fn(&T) -> bool) -> Option<T> {
    let i = rules.iter().position(|r| pred(&r.what))?;
    let r = &mut rules[i];
    let what = r.what.clone();
    if r.remaining != u32::MAX {
        r.remaining -= 1;
    }
    if r.remaining == 0 {
        rules.remove(i);
    }
    Some(what)
}

/// Every injected fault still armed.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    requests: Vec<Counted<(Match, RequestFault)>>,
    fail_start: Vec<Counted<(String, String)>>,
    holds: Vec<String>,
    exec: Vec<Counted<(Option<String>, ExecFault)>>,
}

impl Faults {
    pub fn add_request(&mut self, m: Match, times: Times, fault: RequestFault) {
        if times.0 > 0 {
            self.requests.push(Counted {
                what: (m, fault),
                remaining: times.0,
            });
        }
    }

    /// The first armed fault matching the request (counted down).
    pub fn take_request(&mut self, method: &str, path: &str) -> Option<RequestFault> {
        take(&mut self.requests, |(m, _)| m.matches(method, path)).map(|(_, f)| f)
    }

    pub fn add_fail_start(&mut self, prefix: String, message: String, times: Times) {
        if times.0 > 0 {
            self.fail_start.push(Counted {
                what: (prefix, message),
                remaining: times.0,
            });
        }
    }

    /// The start failure for a job, if one is armed (counted down).
    pub fn take_fail_start(&mut self, job_id: &str) -> Option<String> {
        take(&mut self.fail_start, |(p, _)| {
            job_id.starts_with(p.as_str())
        })
        .map(|(_, m)| m)
    }

    pub fn hold(&mut self, prefix: String) {
        self.holds.push(prefix);
    }

    pub fn unhold(&mut self, prefix: &str) {
        self.holds.retain(|p| p != prefix);
    }

    /// Whether allocations of the job stay pending.
    pub fn is_held(&self, job_id: &str) -> bool {
        self.holds.iter().any(|p| job_id.starts_with(p.as_str()))
    }

    pub fn add_exec(&mut self, alloc: Option<String>, fault: ExecFault, times: Times) {
        if times.0 > 0 {
            self.exec.push(Counted {
                what: (alloc, fault),
                remaining: times.0,
            });
        }
    }

    /// The exec fault for a session in `alloc_id`, if one is armed (counted down).
    pub fn take_exec(&mut self, alloc_id: &str) -> Option<ExecFault> {
        take(&mut self.exec, |(a, _)| {
            a.as_deref().is_none_or(|a| a == alloc_id)
        })
        .map(|(_, f)| f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(Match::path("/v1/job/*/allocations").matches("GET", "/v1/job/a-b/allocations"));
        assert!(!Match::path("/v1/job/*/allocations").matches("GET", "/v1/job/a/b/allocations"));
        assert!(Match::path("/v1/allocation/*").matches("GET", "/v1/allocation/x"));
        assert!(!Match::path("/v1/allocation/*").matches("GET", "/v1/allocations"));
        assert!(Match::any().matches("GET", "/v1/jobs"));
        assert!(
            Match::path("/v1/jobs")
                .method("PUT")
                .matches("put", "/v1/jobs")
        );
        assert!(
            !Match::path("/v1/jobs")
                .method("PUT")
                .matches("GET", "/v1/jobs")
        );
        assert!(Match::path("/v1/job*").matches("GET", "/v1/jobs"));
    }

    #[test]
    fn counted_faults_run_out() {
        let mut f = Faults::default();
        f.add_request(Match::any(), Times(2), RequestFault::Drop);
        assert!(f.take_request("GET", "/x").is_some());
        assert!(f.take_request("GET", "/x").is_some());
        assert!(f.take_request("GET", "/x").is_none());
    }
}
