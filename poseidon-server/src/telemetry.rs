//! Logging set-up: text or JSON (`logger.formatter`), level from `logger.level` unless
//! `RUST_LOG` is set, and Sentry when `sentry.dsn` is set.
//!
//! With Sentry, warnings and errors become Sentry events tagged with the `runner_id`,
//! `environment_id`, `execution_id` and `request_id` of the event or of the spans it happened
//! in; info lines become breadcrumbs; the per-request span ([`crate::request_log`]) becomes a
//! transaction, sampled by `sentry.tracessamplerate`. Without a DSN neither the Sentry client
//! nor its layers exist, so logging costs what it did before.

use std::fmt;

use sentry::integrations::tracing::EventMapping;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

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

/// What the Sentry client needs (Poseidon's `sentry.*` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct SentrySettings {
    /// Where events go, e.g. `https://key@sentry.example.org/1`.
    pub dsn: String,
    /// `sentry.environment` (e.g. `production`); `None` leaves Sentry's default.
    pub environment: Option<String>,
    /// `sentry.release`.
    pub release: Option<String>,
    /// Share of request transactions sent, in [0, 1] (`sentry.tracessamplerate`).
    pub traces_sample_rate: f32,
    /// Attach stack traces to events (`sentry.attachstacktrace`, default true).
    pub attach_stacktrace: bool,
    /// Sentry's own debug output (`sentry.debug`).
    pub debug: bool,
}

/// Keeps the Sentry client alive; dropping it flushes queued events (bounded by a timeout).
pub struct TelemetryGuard {
    _sentry: Option<sentry::ClientInitGuard>,
}

impl fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("sentry", &self._sentry.is_some())
            .finish()
    }
}

/// Installs the global subscriber (writing to stderr). Calling it twice is harmless.
pub fn init(level: &str, format: &str) {
    drop(init_with(level, format, None));
}

/// Installs the global subscriber writing to stderr and, with `sentry`, starts the Sentry
/// client and sends events and transactions to it. Keep the guard until the process ends.
pub fn init_with(level: &str, format: &str, sentry: Option<&SentrySettings>) -> TelemetryGuard {
    let guard = sentry.map(start_sentry);
    let writer = std::io::stderr;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = tracing_subscriber::registry()
        .with(env_filter(level))
        .with(format_layer(format, writer, ansi))
        .with(guard.as_ref().map(|_| sentry_layer()))
        .with(guard.as_ref().map(|_| IdFieldsLayer))
        .try_init();
    if result.is_err() {
        tracing::debug!("a tracing subscriber was already installed");
    }
    TelemetryGuard { _sentry: guard }
}

fn env_filter(level: &str) -> EnvFilter {
    let level = level_filter(level).unwrap_or(LevelFilter::INFO);
    EnvFilter::builder()
        .with_default_directive(level.into())
        .from_env_lossy()
}

/// The text or JSON layer writing to `writer`. JSON is one object per line, with the event's
/// fields and those of the spans it happened in (the request's id and runner ids).
pub fn format_layer<S, W>(
    format: &str,
    writer: W,
    ansi: bool,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match Format::parse(format).unwrap_or(Format::Text) {
        Format::Text => Box::new(layer.with_ansi(ansi)),
        Format::Json => Box::new(layer.json().with_current_span(true).with_span_list(true)),
    }
}

static SENTRY_ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a Sentry client was started in this process (request spans then name their
/// transaction).
pub fn sentry_enabled() -> bool {
    SENTRY_ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Starts the Sentry client.
pub fn start_sentry(settings: &SentrySettings) -> sentry::ClientInitGuard {
    SENTRY_ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
    sentry::init(sentry::ClientOptions {
        dsn: settings.dsn.parse().ok(),
        environment: settings.environment.clone().map(Into::into),
        release: settings.release.clone().map(Into::into),
        traces_sample_rate: settings.traces_sample_rate,
        attach_stacktrace: settings.attach_stacktrace,
        debug: settings.debug,
        ..sentry::ClientOptions::default()
    })
}

/// The layer that turns warnings and errors into Sentry events, info lines into breadcrumbs and
/// info spans (the per-request span) into transactions.
pub fn sentry_layer<S>() -> impl Layer<S> + Send + Sync + 'static
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    sentry::integrations::tracing::layer().event_mapper(map_event)
}

fn map_event<S>(event: &Event<'_>, ctx: Context<'_, S>) -> EventMapping
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    use sentry::integrations::tracing::{breadcrumb_from_event, event_from_event};
    match *event.metadata().level() {
        Level::ERROR | Level::WARN => {
            let mut sentry_event = event_from_event(event, &ctx);
            let mut ids = IdFields::default();
            event.record(&mut ids);
            if let Some(scope) = ctx.event_scope(event) {
                for span in scope {
                    if let Some(stored) = span.extensions().get::<IdFields>() {
                        ids.fill_from(stored);
                    }
                }
            }
            for (key, value) in ids.entries() {
                sentry_event.tags.insert(key.to_string(), value.to_string());
            }
            EventMapping::Event(sentry_event)
        }
        Level::INFO => EventMapping::Breadcrumb(breadcrumb_from_event(event, &ctx)),
        _ => EventMapping::Ignore,
    }
}

/// The ids Sentry events are tagged with, as recorded by an event or a span.
#[derive(Debug, Default, Clone)]
struct IdFields {
    runner_id: Option<String>,
    environment_id: Option<String>,
    execution_id: Option<String>,
    request_id: Option<String>,
}

impl IdFields {
    fn slot(&mut self, name: &str) -> Option<&mut Option<String>> {
        match name {
            "runner_id" => Some(&mut self.runner_id),
            "environment_id" => Some(&mut self.environment_id),
            "execution_id" => Some(&mut self.execution_id),
            "request_id" => Some(&mut self.request_id),
            _ => None,
        }
    }

    /// Takes the ids this one lacks from `other` (an enclosing span).
    fn fill_from(&mut self, other: &IdFields) {
        fn fill(mine: &mut Option<String>, theirs: &Option<String>) {
            if mine.is_none() {
                mine.clone_from(theirs);
            }
        }
        fill(&mut self.runner_id, &other.runner_id);
        fill(&mut self.environment_id, &other.environment_id);
        fill(&mut self.execution_id, &other.execution_id);
        fill(&mut self.request_id, &other.request_id);
    }

    fn entries(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("runner_id", &self.runner_id),
            ("environment_id", &self.environment_id),
            ("execution_id", &self.execution_id),
            ("request_id", &self.request_id),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }
}

impl Visit for IdFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if let Some(slot) = self.slot(field.name()) {
            *slot = Some(value.to_string());
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if let Some(slot) = self.slot(field.name()) {
            *slot = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if let Some(slot) = self.slot(field.name()) {
            // `%id` fields arrive here as `Display` wrapped in `Debug`: no quotes.
            *slot = Some(format!("{value:?}"));
        }
    }
}

/// Keeps the ids a span was created with (or recorded later) in its extensions, for
/// [`map_event`]. Installed only with Sentry.
struct IdFieldsLayer;

impl<S> Layer<S> for IdFieldsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut ids = IdFields::default();
        attrs.record(&mut ids);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(ids);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            let mut extensions = span.extensions_mut();
            if let Some(ids) = extensions.get_mut::<IdFields>() {
                values.record(ids);
            }
        }
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

    #[test]
    fn warnings_become_events_tagged_with_the_ids_of_their_spans() {
        use tracing_subscriber::layer::SubscriberExt;
        let events = sentry::test::with_captured_events(|| {
            let subscriber = tracing_subscriber::registry()
                .with(IdFieldsLayer)
                .with(sentry_layer());
            tracing::subscriber::with_default(subscriber, || {
                let request = tracing::info_span!(
                    "request",
                    request_id = "r-1",
                    runner_id = tracing::field::Empty
                );
                request.record("runner_id", "0-outer");
                let _request = request.enter();
                let execution = tracing::info_span!(
                    "execution",
                    runner_id = "0-abc",
                    environment_id = 12_u64,
                    execution_id = %"e-7"
                );
                let _execution = execution.enter();
                tracing::info!("a breadcrumb, not an event");
                tracing::warn!(error = "boom", "the execution could not be started");
                tracing::debug!("ignored");
            });
        });
        assert_eq!(events.len(), 1, "{events:?}");
        let tags = &events[0].tags;
        assert_eq!(tags.get("runner_id").map(String::as_str), Some("0-abc"));
        assert_eq!(tags.get("environment_id").map(String::as_str), Some("12"));
        assert_eq!(tags.get("execution_id").map(String::as_str), Some("e-7"));
        assert_eq!(tags.get("request_id").map(String::as_str), Some("r-1"));
        assert_eq!(events[0].level, sentry::Level::Warning);
        assert_eq!(events[0].breadcrumbs.len(), 1);
    }

    #[test]
    fn ids_of_an_event_win_over_those_of_its_spans() {
        let mut event = IdFields {
            runner_id: Some("0-a".into()),
            ..IdFields::default()
        };
        let span = IdFields {
            runner_id: Some("0-b".into()),
            request_id: Some("r1".into()),
            ..IdFields::default()
        };
        event.fill_from(&span);
        let entries: Vec<_> = event.entries().collect();
        assert_eq!(entries, vec![("runner_id", "0-a"), ("request_id", "r1")]);
    }
}
