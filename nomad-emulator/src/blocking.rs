//! Query parameters every endpoint shares and Nomad's blocking queries (nomad.md §5.4.1).

use std::time::Duration;

use crate::emulator::Inner;
use crate::state::Table;

/// Parses a Go duration (`300ms`, `1.5h`, `2m30s`); `None` when malformed.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * factor;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// The default and the maximum `wait` of a blocking query.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Blocks while `table`'s index is ≤ `index`, at most `wait` (plus jitter when configured).
/// Returns the table's index to answer with (at least 1).
pub(crate) async fn block(
    inner: &Inner,
    table: Table,
    index: Option<u64>,
    wait: Option<Duration>,
) -> u64 {
    let current = || inner.lock().tables.get(table).max(1);
    let Some(index) = index else {
        return current();
    };
    let mut wait = wait.unwrap_or(DEFAULT_WAIT).min(MAX_WAIT);
    if inner.config.blocking_jitter && wait > Duration::ZERO {
        let max_jitter = wait.as_nanos() / 16;
        let j = fastrand::u64(0..=u64::try_from(max_jitter).unwrap_or(0));
        wait += Duration::from_nanos(j);
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = inner.lock().index_tx.subscribe();
    loop {
        let now = current();
        if now > index {
            return now;
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return now,
            _ = tokio::time::sleep_until(deadline) => return current(),
            r = rx.changed() => if r.is_err() { return current() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("abc"), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("-1s"), None);
    }
}
