//! `poseidon-bench`: claim, execute, file and scale benchmarks of the server, each against a
//! baseline measured in the same run, interleaved. See BENCHMARKS.md.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod alloc;
mod nomad;
mod prewarm;
mod scale;
mod scenarios;
mod server;
mod stats;

use clap::Parser;

use scenarios::Effort;
use stats::Report;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// Benchmarks of the server against baselines measured in the same run.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// One JSON object per scenario and line instead of a table.
    #[arg(long)]
    json: bool,
    /// Run only this scenario (execute, claim, throughput, prewarm, files, scale).
    #[arg(long)]
    scenario: Option<String>,
    /// A short smoke run.
    #[arg(long)]
    quick: bool,
    /// `local` (the embedded backend) or `nomad`: the server on its Nomad adapter against a
    /// nomad-emulator started in this process, running `nomad-claim` and `nomad-execute`, which
    /// also count the Nomad calls per claim and per execution.
    #[arg(long, default_value = "local")]
    backend: String,
}

const SCENARIOS: [&str; 6] = [
    "execute",
    "claim",
    "throughput",
    "prewarm",
    "files",
    "scale",
];

fn main() -> anyhow::Result<()> {
    local_adapter::sandbox_main_if_requested();
    let args = Args::parse();
    let selected: Vec<&str> = match &args.scenario {
        Some(name) if SCENARIOS.contains(&name.as_str()) => vec![name.as_str()],
        Some(name) => anyhow::bail!("unknown scenario {name:?}; one of {SCENARIOS:?}"),
        None => SCENARIOS.to_vec(),
    };
    let effort = Effort { quick: args.quick };
    match args.backend.as_str() {
        "local" => {}
        "nomad" => return run_nomad(effort, args.json),
        other => anyhow::bail!("unknown backend {other:?}; local or nomad"),
    }
    let print = |report: &Report| {
        if args.json {
            println!("{}", report.json());
        } else {
            println!("{}", report.row());
        }
    };
    let needs_server = selected
        .iter()
        .any(|s| matches!(*s, "execute" | "claim" | "throughput" | "files"));
    let runtime = tokio::runtime::Runtime::new()?;
    if needs_server {
        let binary = server::server_binary()?;
        runtime.block_on(async {
            let child = server::ServerChild::start(&binary, &[]).await?;
            let api = server::Api::new(&child.api);
            for name in &selected {
                let report = match *name {
                    "execute" => scenarios::execute(&api, effort).await?,
                    "claim" => scenarios::claim(&api, effort).await?,
                    "throughput" => scenarios::throughput(&api, effort).await?,
                    "files" => scenarios::files(&api, effort).await?,
                    _ => continue,
                };
                print(&report);
            }
            drop(child);
            anyhow::Ok(())
        })?;
    }
    if selected.contains(&"prewarm") {
        print(&runtime.block_on(prewarm::prewarm(effort))?);
    }
    drop(runtime);
    if selected.contains(&"scale") {
        print(&scale::scale(effort)?);
    }
    Ok(())
}

/// The Nomad mode: an emulated cluster, the server on it, the Nomad scenarios.
fn run_nomad(effort: Effort, json: bool) -> anyhow::Result<()> {
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
            for report in [
                nomad::execute(&api, &cluster, effort).await?,
                nomad::claim(&api, &cluster, effort).await?,
            ] {
                if json {
                    println!("{}", report.json());
                } else {
                    println!("{}", report.row());
                }
            }
            drop(child);
            anyhow::Ok(())
        }
        .await;
        cluster.stop().await;
        result
    })
}
