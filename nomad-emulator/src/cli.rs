//! The `nomad-emulator` command line: arguments and the serve loop (until ctrl-c).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

use crate::config::EmulatorConfig;
use crate::emulator::NomadEmulator;
use crate::runtime::AllocationRuntime;

/// Arguments of the `nomad-emulator` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "nomad-emulator",
    about = "A stand-in Nomad agent for tests and demos"
)]
pub struct Args {
    /// Port to listen on (Nomad's is 4646; 0 picks a free one).
    #[arg(long, default_value_t = 4646)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: IpAddr,
    /// The ACL token every request must carry in `X-Nomad-Token`.
    #[arg(long, env = "NOMAD_EMULATOR_TOKEN")]
    pub token: Option<String>,
    /// Factor applied to every restart/reschedule delay of the jobs (1.0 = real time).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Directory to persist the cluster state in; a new process on it carries on.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// An image the runtime can run: `NAME=ROOTFS_DIR` (repeatable).
    #[arg(long = "image", value_parser = parse_image)]
    pub images: Vec<(String, PathBuf)>,
    /// Namespaces besides `default` (repeatable).
    #[arg(long = "namespace")]
    pub namespaces: Vec<String>,
}

fn parse_image(s: &str) -> Result<(String, PathBuf), String> {
    let (name, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ROOTFS_DIR, got {s:?}"))?;
    if name.is_empty() || dir.is_empty() {
        return Err(format!("expected NAME=ROOTFS_DIR, got {s:?}"));
    }
    Ok((name.to_owned(), PathBuf::from(dir)))
}

impl Args {
    /// The `--image` mappings: image name to root-filesystem directory.
    pub fn image_map(&self) -> BTreeMap<String, PathBuf> {
        self.images.iter().cloned().collect()
    }

    /// The emulator configuration these arguments describe.
    pub fn config(&self) -> EmulatorConfig {
        let mut c = EmulatorConfig {
            address: self.address,
            port: self.port,
            token: self.token.clone(),
            time_scale: self.time_scale,
            data_dir: self.data_dir.clone(),
            ..EmulatorConfig::default()
        };
        c.namespaces.extend(self.namespaces.iter().cloned());
        c
    }
}

/// Serves until ctrl-c, then shuts down cleanly (the state is written to `--data-dir`).
pub async fn serve(args: Args, runtime: Arc<dyn AllocationRuntime>) -> anyhow::Result<()> {
    let emu = NomadEmulator::start(args.config(), runtime).await?;
    tracing::info!(url = %emu.base_url(), "serving; ctrl-c stops");
    tokio::signal::ctrl_c().await?;
    emu.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_flags() {
        let a = Args::try_parse_from([
            "nomad-emulator",
            "--port",
            "0",
            "--token",
            "t",
            "--time-scale",
            "0.5",
            "--data-dir",
            "/tmp/x",
            "--image",
            "a=/r/a",
            "--image",
            "b=/r/b",
        ])
        .unwrap();
        assert_eq!(a.port, 0);
        assert_eq!(a.image_map().get("b"), Some(&PathBuf::from("/r/b")));
        assert_eq!(a.config().time_scale, 0.5);
        assert!(Args::try_parse_from(["nomad-emulator", "--image", "nodir"]).is_err());
        assert_eq!(Args::try_parse_from(["nomad-emulator"]).unwrap().port, 4646);
    }
}
