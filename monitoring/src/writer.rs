//! The batching InfluxDB v2 writer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::line_protocol::Point;

/// Why the writer cannot start.
#[derive(Debug, thiserror::Error)]
pub enum InfluxError {
    /// The server URL is not an absolute `http`/`https` URL.
    #[error("`{url}` is not an http(s) URL: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Where and how points are written.
#[derive(Debug, Clone)]
pub struct InfluxConfig {
    /// The InfluxDB server, e.g. `http://influxdb:8086` (a path prefix is kept).
    pub url: String,
    /// The API token, sent as `Authorization: Token <token>` (empty: no header).
    pub token: String,
    /// The organization (`org` query parameter).
    pub organization: String,
    /// The bucket (`bucket` query parameter).
    pub bucket: String,
    /// Tags added to every point that does not set them itself (e.g. `stage`).
    pub default_tags: BTreeMap<String, String>,
    /// Points buffered between the request path and the sender; more are dropped.
    pub capacity: usize,
    /// A batch is sent when it holds this many points…
    pub batch_size: usize,
    /// …or when this much time has passed since the last send.
    pub flush_interval: Duration,
    /// Attempts after the first before a batch is dropped.
    pub max_retries: u32,
    /// The wait before the first retry; doubled for each further one.
    pub retry_backoff: Duration,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// How long [`InfluxWriter::shutdown`] may take (final flush included).
    pub shutdown_timeout: Duration,
}

impl InfluxConfig {
    /// A configuration with the default batching (1000 points or 1 s, buffer 10 000, 3 retries
    /// starting at 500 ms, 5 s per request, 5 s for the shutdown).
    pub fn new(
        url: impl Into<String>,
        token: impl Into<String>,
        organization: impl Into<String>,
        bucket: impl Into<String>,
    ) -> Self {
        Self {
            url: url.into(),
            token: token.into(),
            organization: organization.into(),
            bucket: bucket.into(),
            default_tags: BTreeMap::new(),
            capacity: 10_000,
            batch_size: 1000,
            flush_interval: Duration::from_secs(1),
            max_retries: 3,
            retry_backoff: Duration::from_millis(500),
            request_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// The write endpoint for `url`: `{url}/api/v2/write?org=…&bucket=…&precision=ns`.
pub fn write_url(url: &str, organization: &str, bucket: &str) -> Result<Url, InfluxError> {
    let invalid = |reason: &str| InfluxError::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let mut parsed = Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("a host is required"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("a query or fragment is not allowed"));
    }
    parsed
        .path_segments_mut()
        .map_err(|()| invalid("cannot be a base URL"))?
        .pop_if_empty()
        .extend(["api", "v2", "write"]);
    parsed
        .query_pairs_mut()
        .append_pair("org", organization)
        .append_pair("bucket", bucket)
        .append_pair("precision", "ns");
    Ok(parsed)
}

/// Sends points to InfluxDB in batches from a background task. Cheap to clone; every clone
/// feeds the same task.
#[derive(Debug, Clone)]
pub struct InfluxWriter {
    sender: mpsc::Sender<Point>,
    dropped: Arc<AtomicU64>,
    default_tags: Arc<BTreeMap<String, String>>,
    stop: CancellationToken,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
    shutdown_timeout: Duration,
}

impl InfluxWriter {
    /// Validates `config` and starts the sending task on the current tokio runtime.
    pub fn start(config: InfluxConfig) -> Result<Self, InfluxError> {
        let endpoint = write_url(&config.url, &config.organization, &config.bucket)?;
        let client = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .build()?;
        let (sender, receiver) = mpsc::channel(config.capacity.max(1));
        let stop = CancellationToken::new();
        let sender_task = Sender {
            client,
            endpoint,
            token: config.token.clone(),
            batch_size: config.batch_size.max(1),
            flush_interval: config.flush_interval.max(Duration::from_millis(1)),
            max_retries: config.max_retries,
            retry_backoff: config.retry_backoff,
        };
        let task = tokio::spawn(sender_task.run(receiver, stop.clone()));
        tracing::info!(url = %config.url, bucket = %config.bucket, "writing metrics to InfluxDB");
        Ok(Self {
            sender,
            dropped: Arc::new(AtomicU64::new(0)),
            default_tags: Arc::new(config.default_tags),
            stop,
            task: Arc::new(Mutex::new(Some(task))),
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// Queues `point` without waiting; when the buffer is full (or the writer stopped) the
    /// point is dropped and counted.
    pub fn write(&self, mut point: Point) {
        for (key, value) in self.default_tags.iter() {
            if !point.tags.contains_key(key) {
                point.tags.insert(key.clone(), value.clone());
            }
        }
        if self.sender.try_send(point).is_err() {
            let before = self.dropped.fetch_add(1, Ordering::Relaxed);
            // One warning per 1000 drops: a full buffer must not flood the log either.
            if before.is_multiple_of(1000) {
                tracing::warn!(
                    dropped = before + 1,
                    "InfluxDB buffer full or writer stopped: metric points dropped"
                );
            }
        }
    }

    /// Points dropped so far because the buffer was full or the writer stopped.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends what is buffered and stops the task, waiting at most the configured shutdown
    /// timeout (then the task is aborted and what it held is lost). Later writes are dropped.
    /// Calling it again returns at once.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let task = self.task.lock().await.take();
        let Some(mut task) = task else {
            return;
        };
        if tokio::time::timeout(self.shutdown_timeout, &mut task)
            .await
            .is_err()
        {
            task.abort();
            tracing::warn!("InfluxDB writer did not finish its final flush in time; aborted");
        }
    }
}

/// The background task's side.
#[derive(Debug)]
struct Sender {
    client: reqwest::Client,
    endpoint: Url,
    token: String,
    batch_size: usize,
    flush_interval: Duration,
    max_retries: u32,
    retry_backoff: Duration,
}

impl Sender {
    async fn run(self, mut receiver: mpsc::Receiver<Point>, stop: CancellationToken) {
        let mut batch: Vec<String> = Vec::with_capacity(self.batch_size);
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + self.flush_interval,
            self.flush_interval,
        );
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                point = receiver.recv() => {
                    let Some(point) = point else { break };
                    self.push(&mut batch, &point);
                    if batch.len() >= self.batch_size {
                        self.send(std::mem::take(&mut batch)).await;
                        ticker.reset();
                    }
                }
                _ = ticker.tick() => {
                    if !batch.is_empty() {
                        self.send(std::mem::take(&mut batch)).await;
                    }
                }
            }
        }
        // Final flush: whatever was queued before the stop.
        receiver.close();
        while let Ok(point) = receiver.try_recv() {
            self.push(&mut batch, &point);
            if batch.len() >= self.batch_size {
                self.send(std::mem::take(&mut batch)).await;
            }
        }
        if !batch.is_empty() {
            self.send(batch).await;
        }
        tracing::debug!("InfluxDB writer stopped");
    }

    fn push(&self, batch: &mut Vec<String>, point: &Point) {
        match point.to_line() {
            Ok(line) => batch.push(line),
            Err(e) => tracing::warn!("metric point not written: {e}"),
        }
    }

    /// Sends one batch, retrying with exponential backoff; gives it up with a warning.
    async fn send(&self, batch: Vec<String>) {
        let points = batch.len();
        let mut body = batch.join("\n");
        body.push('\n');
        let mut backoff = self.retry_backoff;
        let mut attempt = 0;
        loop {
            match self.post(body.clone()).await {
                Ok(()) => return,
                Err(Failure::Permanent(reason)) => {
                    tracing::warn!(points, %reason, "InfluxDB refused a batch; dropped");
                    return;
                }
                Err(Failure::Transient(reason)) if attempt < self.max_retries => {
                    attempt += 1;
                    tracing::debug!(points, attempt, %reason, "InfluxDB write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
                Err(Failure::Transient(reason)) => {
                    tracing::warn!(
                        points,
                        attempts = attempt + 1,
                        %reason,
                        "InfluxDB write failed; batch dropped"
                    );
                    return;
                }
            }
        }
    }

    async fn post(&self, body: String) -> Result<(), Failure> {
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body);
        if !self.token.is_empty() {
            request = request.header(AUTHORIZATION, format!("Token {}", self.token));
        }
        let response = request
            .send()
            .await
            .map_err(|e| Failure::Transient(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let reason = format!("{status}: {}", text.chars().take(200).collect::<String>());
        // Bad data or credentials do not get better by retrying; overload and outages may.
        if status.is_client_error()
            && status != StatusCode::TOO_MANY_REQUESTS
            && status != StatusCode::REQUEST_TIMEOUT
        {
            Err(Failure::Permanent(reason))
        } else {
            Err(Failure::Transient(reason))
        }
    }
}

#[derive(Debug)]
enum Failure {
    Transient(String),
    Permanent(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_url_appends_the_api_path_and_query() {
        let u = write_url("http://influx:8086", "my org", "b&c").expect("valid");
        assert_eq!(
            u.as_str(),
            "http://influx:8086/api/v2/write?org=my+org&bucket=b%26c&precision=ns"
        );
        let u = write_url("https://example.org/influx/", "o", "b").expect("valid");
        assert_eq!(
            u.as_str(),
            "https://example.org/influx/api/v2/write?org=o&bucket=b&precision=ns"
        );
    }

    #[test]
    fn invalid_urls_are_refused() {
        for url in ["", "influx:8086", "ftp://x", "not a url", "http://x/?a=b"] {
            assert!(write_url(url, "o", "b").is_err(), "{url}");
        }
    }

    #[tokio::test]
    async fn a_full_buffer_drops_and_counts_instead_of_blocking() {
        let mut config = InfluxConfig::new("http://127.0.0.1:9", "", "o", "b");
        config.capacity = 2;
        config.shutdown_timeout = Duration::from_millis(100);
        config.max_retries = 0;
        let writer = InfluxWriter::start(config).expect("start");
        // The current-thread runtime does not run the task between these calls.
        for i in 0..10_i64 {
            writer.write(Point::new("m").field("i", i));
        }
        assert_eq!(writer.dropped(), 8);
        writer.shutdown().await;
        writer.write(Point::new("m").field("i", 1_i64));
        assert_eq!(writer.dropped(), 9);
    }
}
