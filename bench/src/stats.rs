//! Latency samples and the one-line report every scenario prints.

use std::time::Duration;

use serde_json::json;

use crate::footprint::Footprint;
use crate::targets;

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
    /// The server's footprint over the run (the soak scenario only).
    pub footprint: Option<Footprint>,
}

impl Report {
    /// The JSON line of the `--json` output: the figures, `target` (e.g. `"<= 1.5"`, null
    /// without one) and `met` (true, false, null without a target), and for the soak the
    /// footprint as `rss_start_kib`, `rss_end_kib`, `fds_start`, `fds_end`, `procs_start`,
    /// `procs_end`.
    pub fn json(&self) -> String {
        let mut line = json!({
            "scenario": self.scenario,
            "p50_ms": round(self.p50_ms),
            "p99_ms": round(self.p99_ms),
            "per_s": round(self.per_s),
            "baseline_p50_ms": round(self.baseline_p50_ms),
            "ratio": round(self.ratio),
            "target": targets::target_of(self.scenario).map(|t| t.goal.to_string()),
            "met": targets::met(self),
        });
        if let Some(f) = &self.footprint {
            line["rss_start_kib"] = f.rss_start_kib.into();
            line["rss_end_kib"] = f.rss_end_kib.into();
            line["fds_start"] = f.fds_start.into();
            line["fds_end"] = f.fds_end.into();
            line["procs_start"] = f.procs_start.into();
            line["procs_end"] = f.procs_end.into();
        }
        line.to_string()
    }

    /// A human-readable table row, ending in `target <goal>  met yes|no` (`target -  met -`
    /// without a target).
    pub fn row(&self) -> String {
        let (target, met) = match targets::target_of(self.scenario) {
            Some(t) => (
                t.goal.to_string(),
                if t.goal.met_by(self) { "yes" } else { "no" },
            ),
            None => ("-".to_owned(), "-"),
        };
        format!(
            "{:<11} p50 {:>9.3} ms  p99 {:>9.3} ms  {:>10.1}/s  baseline p50 {:>9.3} ms  ratio {:>7.3}  {}  target {target}  met {met}",
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

    fn report(scenario: &'static str, ratio: f64) -> Report {
        Report {
            scenario,
            p50_ms: 2.0,
            p99_ms: 3.0,
            per_s: 500.0,
            baseline_p50_ms: 1.0,
            ratio,
            note: "a note".to_owned(),
            footprint: None,
        }
    }

    #[test]
    fn json_and_row_carry_the_target_and_whether_it_was_met() {
        let missed: serde_json::Value =
            serde_json::from_str(&report("execute", 2.0).json()).unwrap();
        assert_eq!(missed["target"], "<= 1.5");
        assert_eq!(missed["met"], false);
        assert_eq!(missed["ratio"], 2.0);
        let met: serde_json::Value = serde_json::from_str(&report("execute", 1.2).json()).unwrap();
        assert_eq!(met["met"], true);
        let none: serde_json::Value =
            serde_json::from_str(&report("nomad-claim", 9.0).json()).unwrap();
        assert!(none["target"].is_null() && none["met"].is_null());
        assert!(none.get("rss_start_kib").is_none());

        assert!(
            report("execute", 2.0)
                .row()
                .ends_with("a note  target <= 1.5  met no")
        );
        assert!(
            report("throughput", 0.7)
                .row()
                .ends_with("target >= 0.6  met yes")
        );
        assert!(
            report("nomad-claim", 9.0)
                .row()
                .ends_with("target -  met -")
        );
    }

    #[test]
    fn the_soak_json_carries_its_footprint() {
        let mut soak = report("soak", 1.0);
        soak.footprint = Some(Footprint {
            rss_start_kib: 1000,
            rss_end_kib: 1100,
            fds_start: 20,
            fds_end: 21,
            procs_start: 8,
            procs_end: 8,
        });
        let line: serde_json::Value = serde_json::from_str(&soak.json()).unwrap();
        assert_eq!(line["target"], "flat");
        assert_eq!(line["met"], true);
        assert_eq!(line["rss_start_kib"], 1000);
        assert_eq!(line["rss_end_kib"], 1100);
        assert_eq!(line["fds_start"], 20);
        assert_eq!(line["fds_end"], 21);
        assert_eq!(line["procs_end"], 8);
    }
}
