//! Logging set-up: text or JSON (`logger.formatter`), level from `logger.level` unless
//! `RUST_LOG` is set.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// The log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Format {
    /// Parses Poseidon's formatter names (`TextFormatter`, `JSONFormatter`) or `text`/`json`.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "textformatter" | "text" | "" => Ok(Self::Text),
            "jsonformatter" | "json" => Ok(Self::Json),
            _ => Err(format!(
                "unknown formatter {name:?} (TextFormatter or JSONFormatter)"
            )),
        }
    }
}

/// Parses a logrus or tracing level name, any case.
pub fn level_filter(name: &str) -> Result<LevelFilter, String> {
    match name.to_ascii_lowercase().as_str() {
        "trace" => Ok(LevelFilter::TRACE),
        "debug" => Ok(LevelFilter::DEBUG),
        "info" | "" => Ok(LevelFilter::INFO),
        "warn" | "warning" => Ok(LevelFilter::WARN),
        "error" | "fatal" | "panic" => Ok(LevelFilter::ERROR),
        "off" => Ok(LevelFilter::OFF),
        _ => Err(format!("unknown level {name:?}")),
    }
}

/// Installs the global subscriber (writing to stderr). Calling it twice is harmless.
pub fn init(level: &str, format: &str) {
    let level = level_filter(level).unwrap_or(LevelFilter::INFO);
    let filter = EnvFilter::builder()
        .with_default_directive(level.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match Format::parse(format).unwrap_or(Format::Text) {
        Format::Text => builder.try_init(),
        Format::Json => builder.json().try_init(),
    };
    if result.is_err() {
        tracing::debug!("a tracing subscriber was already installed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_poseidon_names() {
        assert_eq!(level_filter("INFO"), Ok(LevelFilter::INFO));
        assert_eq!(level_filter("Warning"), Ok(LevelFilter::WARN));
        assert!(level_filter("verbose").is_err());
        assert_eq!(Format::parse("JSONFormatter"), Ok(Format::Json));
        assert_eq!(Format::parse("TextFormatter"), Ok(Format::Text));
        assert!(Format::parse("xml").is_err());
    }
}
