//! The targets every scenario is checked against (issue 14), in one table, and their
//! evaluation. `--check` fails the run when a report misses its target; without it the targets
//! are only printed.

use std::fmt;

use crate::footprint::Footprint;
use crate::stats::Report;

/// What a target compares and in which direction. Every bound is inclusive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// The report's `ratio` is at most the bound (latency-like ratios: lower is better).
    RatioAtMost(f64),
    /// The report's `ratio` is at least the bound (rate ratios: higher is better).
    RatioAtLeast(f64),
    /// The subject's p50 is at most this many milliseconds.
    P50AtMostMs(f64),
    /// The server's footprint is flat over the run: see [`Footprint::is_flat`].
    Flat,
}

/// One scenario's target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The scenario it applies to.
    pub scenario: &'static str,
    /// What is compared, in which direction.
    pub goal: Goal,
}

/// The targets. Scenarios not listed here (`nomad-execute`, `nomad-claim`) have none and never
/// fail the check.
///
/// - `execute`: ratio = subject p50 / bare `bash -c true` p50, at most 1.5.
/// - `throughput`: ratio = executions per second / bare `bash -c true` per second, at least 0.6.
/// - `files`: subject p50 (PATCH 100 × 1 KiB, then list) at most 5 ms.
/// - `prewarm`: ratio = one runner's creation p50 / bare `unshare` p50, at most 2.0.
/// - `claim`: ratio = claim p99 / `GET /health` p99, at most 10.
/// - `scale`: ratio = claim p50 at 100 000 idle runners / at 100, at most 1.2.
/// - `soak`: the server's RSS and open fds flat from after the warm-up to the end.
pub const TARGETS: [Target; 7] = [
    Target {
        scenario: "execute",
        goal: Goal::RatioAtMost(1.5),
    },
    Target {
        scenario: "throughput",
        goal: Goal::RatioAtLeast(0.6),
    },
    Target {
        scenario: "files",
        goal: Goal::P50AtMostMs(5.0),
    },
    Target {
        scenario: "prewarm",
        goal: Goal::RatioAtMost(2.0),
    },
    Target {
        scenario: "claim",
        goal: Goal::RatioAtMost(10.0),
    },
    Target {
        scenario: "scale",
        goal: Goal::RatioAtMost(1.2),
    },
    Target {
        scenario: "soak",
        goal: Goal::Flat,
    },
];

/// The target of `scenario`; `None` for a scenario without one.
pub fn target_of(scenario: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.scenario == scenario)
}

impl fmt::Display for Goal {
    /// `<= 1.5` and `>= 0.6` for ratios (the bare form is always the ratio), `p50 <= 5 ms`,
    /// `flat` for footprints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Goal::RatioAtMost(bound) => write!(f, "<= {bound}"),
            Goal::RatioAtLeast(bound) => write!(f, ">= {bound}"),
            Goal::P50AtMostMs(bound) => write!(f, "p50 <= {bound} ms"),
            Goal::Flat => write!(f, "flat"),
        }
    }
}

impl Goal {
    /// Whether `report` meets this goal. A NaN measure, or a soak report without a footprint,
    /// misses.
    pub fn met_by(self, report: &Report) -> bool {
        match self {
            Goal::RatioAtMost(bound) => report.ratio <= bound,
            Goal::RatioAtLeast(bound) => report.ratio >= bound,
            Goal::P50AtMostMs(bound) => report.p50_ms <= bound,
            Goal::Flat => report.footprint.as_ref().is_some_and(Footprint::is_flat),
        }
    }

    /// The measured value this goal compares, as printed in a miss.
    pub fn measured(self, report: &Report) -> String {
        match self {
            Goal::RatioAtMost(_) | Goal::RatioAtLeast(_) => format!("ratio {:.3}", report.ratio),
            Goal::P50AtMostMs(_) => format!("p50 {:.3} ms", report.p50_ms),
            Goal::Flat => match &report.footprint {
                Some(f) => f.to_string(),
                None => "no footprint measured".to_owned(),
            },
        }
    }
}

/// Whether `report` meets its scenario's target; `None` without a target.
pub fn met(report: &Report) -> Option<bool> {
    target_of(report.scenario).map(|t| t.goal.met_by(report))
}

/// One report that missed its target.
#[derive(Debug, Clone, PartialEq)]
pub struct Miss {
    /// The scenario.
    pub scenario: &'static str,
    /// The compared value as measured, e.g. `ratio 2.081`.
    pub measured: String,
    /// The target, e.g. `<= 1.5`.
    pub target: String,
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: measured {}, target {}",
            self.scenario, self.measured, self.target
        )
    }
}

/// The reports among `reports` that miss their targets, in order.
pub fn misses(reports: &[Report]) -> Vec<Miss> {
    reports
        .iter()
        .filter_map(|report| {
            let target = target_of(report.scenario)?;
            (!target.goal.met_by(report)).then(|| Miss {
                scenario: report.scenario,
                measured: target.goal.measured(report),
                target: target.goal.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(scenario: &'static str, p50_ms: f64, ratio: f64) -> Report {
        Report {
            scenario,
            p50_ms,
            p99_ms: p50_ms,
            per_s: 1.0,
            baseline_p50_ms: 1.0,
            ratio,
            note: String::new(),
            footprint: None,
        }
    }

    fn footprint(rss_end_kib: u64, fds_end: u64) -> Footprint {
        Footprint {
            rss_start_kib: 40_000,
            rss_end_kib,
            fds_start: 30,
            fds_end,
            procs_start: 5,
            procs_end: 5,
        }
    }

    #[test]
    fn execute_ratio_just_under_the_bound_meets_and_just_over_misses() {
        assert_eq!(met(&report("execute", 9.0, 1.49)), Some(true));
        assert_eq!(met(&report("execute", 9.0, 1.5)), Some(true));
        assert_eq!(met(&report("execute", 9.0, 1.51)), Some(false));
    }

    #[test]
    fn throughput_needs_a_ratio_at_least_its_bound() {
        assert_eq!(met(&report("throughput", 80.0, 0.61)), Some(true));
        assert_eq!(met(&report("throughput", 80.0, 0.6)), Some(true));
        assert_eq!(met(&report("throughput", 80.0, 0.59)), Some(false));
        assert_eq!(met(&report("throughput", 80.0, 0.1)), Some(false));
    }

    #[test]
    fn files_compares_the_p50_not_the_ratio() {
        assert_eq!(met(&report("files", 4.9, 100.0)), Some(true));
        assert_eq!(met(&report("files", 5.1, 0.1)), Some(false));
    }

    #[test]
    fn prewarm_claim_and_scale_ratios_are_upper_bounds() {
        for (scenario, bound) in [("prewarm", 2.0), ("claim", 10.0), ("scale", 1.2)] {
            assert_eq!(
                met(&report(scenario, 1.0, bound * 0.99)),
                Some(true),
                "{scenario}"
            );
            assert_eq!(
                met(&report(scenario, 1.0, bound * 1.01)),
                Some(false),
                "{scenario}"
            );
        }
    }

    #[test]
    fn every_ratio_target_flips_at_its_bound_in_its_direction() {
        for target in TARGETS {
            let (bound, lower_is_better) = match target.goal {
                Goal::RatioAtMost(b) => (b, true),
                Goal::RatioAtLeast(b) => (b, false),
                Goal::P50AtMostMs(_) | Goal::Flat => continue,
            };
            let under = met(&report(target.scenario, 1.0, bound * 0.99));
            let over = met(&report(target.scenario, 1.0, bound * 1.01));
            assert_eq!(under, Some(lower_is_better), "{}", target.scenario);
            assert_eq!(over, Some(!lower_is_better), "{}", target.scenario);
        }
    }

    #[test]
    fn a_nan_measure_misses() {
        assert_eq!(met(&report("execute", 1.0, f64::NAN)), Some(false));
        assert_eq!(met(&report("throughput", 1.0, f64::NAN)), Some(false));
        assert_eq!(met(&report("files", f64::NAN, 1.0)), Some(false));
    }

    #[test]
    fn soak_is_flat_within_the_fd_and_rss_slack() {
        let mut soak = report("soak", 5.0, 1.0);
        assert_eq!(met(&soak), Some(false), "no footprint measured");
        // 40 000 KiB × 1.25 + 8 MiB = 58 192 KiB; 30 fds + 8.
        soak.footprint = Some(footprint(58_192, 38));
        assert_eq!(met(&soak), Some(true));
        soak.footprint = Some(footprint(30_000, 10));
        assert_eq!(met(&soak), Some(true), "shrinking is flat");
        soak.footprint = Some(footprint(58_193, 38));
        assert_eq!(met(&soak), Some(false), "rss grew past the slack");
        soak.footprint = Some(footprint(58_192, 39));
        assert_eq!(met(&soak), Some(false), "fds grew past the slack");
    }

    #[test]
    fn the_nomad_scenarios_have_no_target_and_never_miss() {
        let reports = [
            report("nomad-execute", 1e6, 1e6),
            report("nomad-claim", f64::NAN, f64::NAN),
        ];
        assert!(reports.iter().all(|r| met(r).is_none()));
        assert!(misses(&reports).is_empty());
    }

    #[test]
    fn misses_lists_each_missed_scenario_with_its_value_and_target() {
        let reports = [
            report("execute", 5.0, 2.081),
            report("throughput", 80.0, 0.7),
            report("files", 7.8, 2.0),
            report("nomad-claim", 1.0, 99.0),
        ];
        let found = misses(&reports);
        assert_eq!(
            found.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "execute: measured ratio 2.081, target <= 1.5",
                "files: measured p50 7.800 ms, target p50 <= 5 ms",
            ]
        );
    }
}
