//! Latency samples and the one-line report every scenario prints.

use std::time::Duration;

use serde_json::json;

/// Latency samples of one subject.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Adds one sample.
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    /// Adds all samples of `other`.
    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `q` quantile (0..=1) in milliseconds; 0 without samples.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
        sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1e3
    }

    /// Median in milliseconds.
    pub fn p50(&self) -> f64 {
        self.quantile_ms(0.5)
    }

    /// 99th percentile in milliseconds.
    pub fn p99(&self) -> f64 {
        self.quantile_ms(0.99)
    }
}

/// One scenario's result.
#[derive(Debug, Clone)]
pub struct Report {
    /// Scenario name.
    pub scenario: &'static str,
    /// Subject median, ms.
    pub p50_ms: f64,
    /// Subject 99th percentile, ms.
    pub p99_ms: f64,
    /// Subject operations per second.
    pub per_s: f64,
    /// Baseline median, ms.
    pub baseline_p50_ms: f64,
    /// Subject / baseline (see BENCHMARKS.md for each scenario's meaning).
    pub ratio: f64,
    /// Free-form details (baseline figure names, counts).
    pub note: String,
}

impl Report {
    /// The JSON line of the `--json` output.
    pub fn json(&self) -> String {
        json!({
            "scenario": self.scenario,
            "p50_ms": round(self.p50_ms),
            "p99_ms": round(self.p99_ms),
            "per_s": round(self.per_s),
            "baseline_p50_ms": round(self.baseline_p50_ms),
            "ratio": round(self.ratio),
        })
        .to_string()
    }

    /// A human-readable table row.
    pub fn row(&self) -> String {
        format!(
            "{:<11} p50 {:>9.3} ms  p99 {:>9.3} ms  {:>10.1}/s  baseline p50 {:>9.3} ms  ratio {:>7.3}  {}",
            self.scenario,
            self.p50_ms,
            self.p99_ms,
            self.per_s,
            self.baseline_p50_ms,
            self.ratio,
            self.note
        )
    }
}

fn round(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_ranked_samples() {
        let mut s = Samples::default();
        for ms in 1..=100 {
            s.push(Duration::from_millis(ms));
        }
        assert!((s.p50() - 51.0).abs() < 1.0);
        assert!((s.p99() - 99.0).abs() < 1.0);
        assert_eq!(Samples::default().p50(), 0.0);
    }
}
