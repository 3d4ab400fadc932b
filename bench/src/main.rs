//! `poseidon-bench`: claim, execute, file and scale benchmarks of the server, each against a
//! baseline measured in the same run, interleaved. See BENCHMARKS.md.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod alloc;
mod footprint;
mod nomad;
mod prewarm;
mod scale;
mod scenarios;
mod server;
mod soak;
mod stats;
mod targets;

use std::process::ExitCode;

use clap::Parser;

use scenarios::Effort;
use stats::Report;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// Exit code of a `--check` run in which a scenario missed its target (errors exit with 1,
/// bad arguments with 2).
const MISSED_TARGET: u8 = 3;

/// Benchmarks of the server against baselines measured in the same run.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// One JSON object per scenario and line instead of a table.
    #[arg(long)]
    json: bool,
    /// Run only this scenario (execute, claim, throughput, prewarm, files, scale, soak).
    #[arg(long)]
    scenario: Option<String>,
    /// A short smoke run.
    #[arg(long)]
    quick: bool,
    /// After all scenarios ran, exit with 3 and list the misses on stderr when a scenario missed
    /// its target (the table in bench/src/targets.rs). Without it the exit code ignores targets.
    #[arg(long)]
    check: bool,
    /// Also run the soak (never part of the default run): the selected scenarios, then `soak`.
    #[arg(long)]
    soak: bool,
    /// Executions of the soak (default 100 000, 400 with `--quick`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    soak_executions: Option<u64>,
    /// `local` (the embedded backend) or `nomad`: the server on its Nomad adapter against a
    /// nomad-emulator started in this process, running `nomad-claim` and `nomad-execute`, which
    /// also count the Nomad calls per claim and per execution.
    #[arg(long, default_value = "local")]
    backend: String,
}

/// The scenarios of the default run, in order.
const SCENARIOS: [&str; 6] = [
    "execute",
    "claim",
    "throughput",
    "prewarm",
    "files",
    "scale",
];

/// Scenarios that run only when named (`--scenario` or their own flag).
const OPT_IN: [&str; 1] = ["soak"];

fn main() -> anyhow::Result<ExitCode> {
    local_adapter::sandbox_main_if_requested();
    let args = Args::parse();
    let selected = selection(&args)?;
    let effort = Effort { quick: args.quick };
    let mut reports = Vec::new();
    match args.backend.as_str() {
        "local" => run_local(&args, &selected, effort, &mut reports)?,
        "nomad" if selected.contains(&"soak") => {
            anyhow::bail!("the soak runs on the local backend only")
        }
        "nomad" => run_nomad(effort, &args, &mut reports)?,
        other => anyhow::bail!("unknown backend {other:?}; local or nomad"),
    }
    if args.check {
        let misses = targets::misses(&reports);
        if !misses.is_empty() {
            eprintln!(
                "check failed: {} of {} scenarios missed their targets:",
                misses.len(),
                reports.len()
            );
            for miss in &misses {
                eprintln!("  {miss}");
            }
            return Ok(ExitCode::from(MISSED_TARGET));
        }
        let with_target = reports.iter().filter(|r| targets::met(r).is_some()).count();
        eprintln!(
            "check passed: {with_target} scenarios met their targets, {} have none",
            reports.len() - with_target
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The scenarios `args` select: `--scenario`'s one or the default run, plus the soak with
/// `--soak`.
fn selection(args: &Args) -> anyhow::Result<Vec<&'static str>> {
    let mut selected: Vec<&'static str> = match &args.scenario {
        Some(name) => match SCENARIOS
            .iter()
            .chain(&OPT_IN)
            .find(|s| **s == name.as_str())
        {
            Some(known) => vec![*known],
            None => {
                anyhow::bail!("unknown scenario {name:?}; one of {SCENARIOS:?} or {OPT_IN:?}")
            }
        },
        None => SCENARIOS.to_vec(),
    };
    if args.soak && !selected.contains(&"soak") {
        selected.push("soak");
    }
    if args.soak_executions.is_some() && !selected.contains(&"soak") {
        anyhow::bail!("--soak-executions needs --soak or --scenario soak");
    }
    Ok(selected)
}

/// Prints `report` as a table row or a JSON line and keeps it for `--check`.
fn emit(args: &Args, reports: &mut Vec<Report>, report: Report) {
    if args.json {
        println!("{}", report.json());
    } else {
        println!("{}", report.row());
    }
    reports.push(report);
}

/// The local backend's scenarios among `selected`, in the default run's order, then the soak.
fn run_local(
    args: &Args,
    selected: &[&str],
    effort: Effort,
    reports: &mut Vec<Report>,
) -> anyhow::Result<()> {
    let needs_server = selected
        .iter()
        .any(|s| matches!(*s, "execute" | "claim" | "throughput" | "files"));
    let runtime = tokio::runtime::Runtime::new()?;
    if needs_server {
        let binary = server::server_binary()?;
        runtime.block_on(async {
            let child = server::ServerChild::start(&binary, &[]).await?;
            let api = server::Api::new(&child.api);
            for name in selected {
                let report = match *name {
                    "execute" => scenarios::execute(&api, effort).await?,
                    "claim" => scenarios::claim(&api, effort).await?,
                    "throughput" => scenarios::throughput(&api, effort).await?,
                    "files" => scenarios::files(&api, effort).await?,
                    _ => continue,
                };
                emit(args, reports, report);
            }
            drop(child);
            anyhow::Ok(())
        })?;
    }
    if selected.contains(&"prewarm") {
        emit(args, reports, runtime.block_on(prewarm::prewarm(effort))?);
    }
    drop(runtime);
    if selected.contains(&"scale") {
        emit(args, reports, scale::scale(effort)?);
    }
    if selected.contains(&"soak") {
        let executions = match args.soak_executions {
            Some(n) => usize::try_from(n)?,
            None => effort.pick(soak::QUICK_EXECUTIONS, soak::FULL_EXECUTIONS),
        };
        let binary = server::server_binary()?;
        let report = tokio::runtime::Runtime::new()?.block_on(async {
            // A server of its own, so the footprint does not depend on what ran before.
            let child = server::ServerChild::start(&binary, &[]).await?;
            let api = server::Api::new(&child.api);
            let report = soak::soak(&api, child.pid(), executions).await;
            drop(child);
            report
        })?;
        emit(args, reports, report);
    }
    Ok(())
}

/// The Nomad mode: an emulated cluster, the server on it, the Nomad scenarios.
fn run_nomad(effort: Effort, args: &Args, reports: &mut Vec<Report>) -> anyhow::Result<()> {
    let binary = server::server_binary()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let cluster = nomad::Cluster::start().await?;
        let vars = cluster.server_vars();
        let result = async {
            let child = server::ServerChild::start(&binary, &vars).await?;
            let api = server::Api::new(&child.api);
            emit(args, reports, nomad::execute(&api, &cluster, effort).await?);
            emit(args, reports, nomad::claim(&api, &cluster, effort).await?);
            drop(child);
            anyhow::Ok(())
        }
        .await;
        cluster.stop().await;
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_local_scenario_has_a_target_and_no_target_is_orphaned() {
        for scenario in SCENARIOS.iter().chain(&OPT_IN) {
            assert!(targets::target_of(scenario).is_some(), "{scenario}");
        }
        for target in targets::TARGETS {
            assert!(
                SCENARIOS.contains(&target.scenario) || OPT_IN.contains(&target.scenario),
                "{}",
                target.scenario
            );
        }
    }

    #[test]
    fn the_soak_runs_only_when_asked_for() {
        let select = |argv: &[&str]| {
            let args = Args::try_parse_from(["poseidon-bench"].iter().chain(argv))?;
            selection(&args)
        };
        assert_eq!(select(&[]).unwrap(), SCENARIOS);
        assert_eq!(select(&["--quick", "--check"]).unwrap(), SCENARIOS);
        assert_eq!(select(&["--scenario", "soak"]).unwrap(), ["soak"]);
        assert_eq!(
            select(&["--scenario", "execute", "--soak"]).unwrap(),
            ["execute", "soak"]
        );
        assert_eq!(select(&["--soak"]).unwrap().last(), Some(&"soak"));
        assert!(select(&["--soak-executions", "10"]).is_err());
        assert!(select(&["--soak", "--soak-executions", "0"]).is_err());
        assert!(select(&["--scenario", "nope"]).is_err());
    }
}
