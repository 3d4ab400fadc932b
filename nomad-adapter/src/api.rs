//! The REST calls the backend makes, behind [`NomadApi`] so the logic above it is testable
//! without a Nomad.
//!
//! [`HttpNomadApi`] sends them through nomad-client-rs where that crate covers the call without
//! losing anything (job list, purge, leader, and registering a job its types represent fully),
//! and through its own reqwest code where it stops: reading a job as `serde_json::Value` (its
//! types drop fields, so a read-modify-write would lose them), a job's allocations (parsed
//! tolerantly by the same code as the event stream), reading an evaluation (not in the crate),
//! and the event stream (the crate cannot resume, hides heartbeats and batch indexes). When a CA
//! file is configured, every call goes through the own code, since nomad-client-rs can only
//! verify against the system's roots.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

use crate::config::NomadConfig;
use crate::error::{ApiError, NomadError};

/// How long one REST call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest REST answer read (a job list of a big cluster stays well below).
const MAX_BODY: usize = 64 << 20;

/// A job as `GET /v1/jobs` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStub {
    /// The job's id.
    pub id: String,
    /// `pending`, `running` or `dead`.
    pub status: String,
}

/// What a registration answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The evaluation the registration created (empty for periodic/parameterized jobs).
    pub eval_id: String,
}

/// A byte stream of the NDJSON event stream's body.
pub type EventBody = BoxStream<'static, Result<Bytes, ApiError>>;

/// Every REST call of the backend. Implementations add the namespace and the token.
#[async_trait]
pub trait NomadApi: Send + Sync + fmt::Debug + 'static {
    /// `PUT /v1/jobs` with `{"Job": job}`: registers a job or a new version of it.
    async fn register_job(&self, job: &Value) -> Result<Registration, ApiError>;
    /// `GET /v1/job/:id`; `None` when Nomad does not know it.
    async fn read_job(&self, id: &str) -> Result<Option<Value>, ApiError>;
    /// `GET /v1/jobs?prefix=`.
    async fn list_jobs(&self, prefix: &str) -> Result<Vec<JobStub>, ApiError>;
    /// `DELETE /v1/job/:id?purge=true`; succeeds for an unknown job.
    async fn purge_job(&self, id: &str) -> Result<(), ApiError>;
    /// `GET /v1/job/:id/allocations`, as JSON values.
    async fn job_allocations(&self, id: &str) -> Result<Vec<Value>, ApiError>;
    /// `GET /v1/evaluation/:id`; `None` when unknown.
    async fn read_evaluation(&self, id: &str) -> Result<Option<Value>, ApiError>;
    /// `GET /v1/status/leader`.
    async fn leader(&self) -> Result<String, ApiError>;
    /// `GET /v1/event/stream?index=&topic=Job&topic=Allocation&topic=Evaluation`: the body.
    async fn event_stream(&self, index: u64) -> Result<EventBody, ApiError>;
}

/// [`NomadApi`] over HTTP(S).
#[derive(Clone)]
pub struct HttpNomadApi {
    base: String,
    namespace: String,
    token: Option<String>,
    raw: reqwest::Client,
    client_rs: Option<nomad_client_rs::NomadClient>,
}

impl fmt::Debug for HttpNomadApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpNomadApi")
            .field("base", &self.base)
            .field("namespace", &self.namespace)
            .field("nomad_client_rs", &self.client_rs.is_some())
            .finish_non_exhaustive()
    }
}

fn unreachable(e: impl fmt::Display) -> ApiError {
    ApiError::Unreachable(e.to_string())
}

fn from_client_rs(e: nomad_client_rs::ClientError) -> ApiError {
    use nomad_client_rs::ClientError as E;
    match e {
        E::NomadRejected { status, message } => ApiError::Status { status, message },
        E::NomadUnreachable(m) => ApiError::Unreachable(m),
        E::ResponseUnreadable(m) => ApiError::Unreadable(m),
        other => ApiError::Unreachable(other.to_string()),
    }
}

impl HttpNomadApi {
    /// A client for `config`; makes no call yet.
    pub fn new(config: &NomadConfig) -> Result<Self, NomadError> {
        crate::tls::install_crypto_provider();
        let base = config.base_url();
        let tls = crate::tls::client_config(&config.tls)?;
        let raw = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| NomadError::Config(format!("nomad http client: {e}")))?;
        let token = (!config.token.is_empty()).then(|| config.token.clone());
        let client_rs = if config.tls.active && !config.tls.cafile.is_empty() {
            None
        } else {
            let mtls = (!config.tls.certfile.is_empty()).then(|| {
                nomad_client_rs::MtlsConfig::new(&config.tls.certfile, &config.tls.keyfile)
            });
            let rs_config = nomad_client_rs::Config {
                connection: nomad_client_rs::Connection::HttpApi {
                    address: base.clone(),
                    credential: token.clone().map(nomad_client_rs::Credential::AclToken),
                },
                allow_insecure_certs: false,
                mtls,
            };
            Some(
                nomad_client_rs::NomadClient::new(rs_config)
                    .map_err(|e| NomadError::Config(e.to_string()))?,
            )
        };
        Ok(Self {
            base,
            namespace: config.namespace.clone(),
            token,
            raw,
            client_rs,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .raw
            .request(method, format!("{}/v1/{path}", self.base))
            .query(&[("namespace", self.namespace.as_str())]);
        if let Some(token) = &self.token {
            r = r.header("X-Nomad-Token", token);
        }
        r
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Bytes, ApiError> {
        let response = request
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        let body = read_bounded(response).await?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(ApiError::Status {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body).trim().to_string(),
            })
        }
    }

    async fn get_json(&self, path: &str) -> Result<Option<Value>, ApiError> {
        match self.send(self.request(reqwest::Method::GET, path)).await {
            Ok(body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| ApiError::Unreadable(e.to_string())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The job as nomad-client-rs's type, when that type keeps every field of `job`.
    fn typed_without_loss(job: &Value) -> Option<nomad_client_rs::job::Job> {
        let typed: nomad_client_rs::job::Job = serde_json::from_value(job.clone()).ok()?;
        let back = serde_json::to_value(&typed).ok()?;
        (back == *job).then_some(typed)
    }
}

async fn read_bounded(response: reqwest::Response) -> Result<Bytes, ApiError> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(unreachable)?;
        if body.len() + chunk.len() > MAX_BODY {
            return Err(ApiError::Unreadable(format!(
                "the answer is larger than {MAX_BODY} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

fn escape(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[async_trait]
impl NomadApi for HttpNomadApi {
    async fn register_job(&self, job: &Value) -> Result<Registration, ApiError> {
        if let (Some(rs), Some(typed)) = (&self.client_rs, Self::typed_without_loss(job)) {
            let request = nomad_client_rs::job::CreateJobRequest {
                job: Some(typed),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            };
            let answer = rs.create_job(&request).await.map_err(from_client_rs)?;
            return Ok(Registration {
                eval_id: answer.eval_id.unwrap_or_default(),
            });
        }
        let mut job = job.clone();
        if let Some(o) = job.as_object_mut() {
            o.insert("Namespace".into(), Value::String(self.namespace.clone()));
        }
        let body = serde_json::json!({ "Job": job });
        let answer = self
            .send(self.request(reqwest::Method::PUT, "jobs").json(&body))
            .await?;
        let v: Value =
            serde_json::from_slice(&answer).map_err(|e| ApiError::Unreadable(e.to_string()))?;
        Ok(Registration {
            eval_id: v["EvalID"].as_str().unwrap_or_default().to_string(),
        })
    }

    async fn read_job(&self, id: &str) -> Result<Option<Value>, ApiError> {
        self.get_json(&format!("job/{}", escape(id))).await
    }

    async fn list_jobs(&self, prefix: &str) -> Result<Vec<JobStub>, ApiError> {
        let stubs: Vec<(String, String)> = if let Some(rs) = &self.client_rs {
            let options = nomad_client_rs::job::ListJobsOptions {
                prefix: Some(prefix.to_string()),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            };
            rs.list_jobs(&options)
                .await
                .map_err(from_client_rs)?
                .into_iter()
                .map(|s| (s.id.unwrap_or_default(), s.status.unwrap_or_default()))
                .collect()
        } else {
            let body = self
                .send(
                    self.request(reqwest::Method::GET, "jobs")
                        .query(&[("prefix", prefix)]),
                )
                .await?;
            let v: Vec<Value> =
                serde_json::from_slice(&body).map_err(|e| ApiError::Unreadable(e.to_string()))?;
            v.into_iter()
                .map(|s| {
                    (
                        s["ID"].as_str().unwrap_or_default().to_string(),
                        s["Status"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        };
        let mut out: Vec<JobStub> = stubs
            .into_iter()
            .filter(|(id, _)| id.starts_with(prefix) && !id.is_empty())
            .map(|(id, status)| JobStub { id, status })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn purge_job(&self, id: &str) -> Result<(), ApiError> {
        if let Some(rs) = &self.client_rs {
            let options = nomad_client_rs::job::StopJobOptions {
                purge: Some(true),
                namespace: Some(self.namespace.clone()),
                ..Default::default()
            };
            return match rs.stop_job(&escape(id), &options).await {
                Ok(_) => Ok(()),
                // Nomad answers 200 with an empty body for an unknown job.
                Err(nomad_client_rs::ClientError::ResponseUnreadable(_)) => Ok(()),
                Err(e) => match from_client_rs(e) {
                    e if e.is_not_found() => Ok(()),
                    e => Err(e),
                },
            };
        }
        match self
            .send(
                self.request(reqwest::Method::DELETE, &format!("job/{}", escape(id)))
                    .query(&[("purge", "true")]),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn job_allocations(&self, id: &str) -> Result<Vec<Value>, ApiError> {
        let v = self
            .get_json(&format!("job/{}/allocations", escape(id)))
            .await?;
        Ok(match v {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        })
    }

    async fn read_evaluation(&self, id: &str) -> Result<Option<Value>, ApiError> {
        self.get_json(&format!("evaluation/{}", escape(id))).await
    }

    async fn leader(&self) -> Result<String, ApiError> {
        if let Some(rs) = &self.client_rs {
            return rs.read_leader().await.map_err(from_client_rs);
        }
        let body = self
            .send(self.request(reqwest::Method::GET, "status/leader"))
            .await?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Unreadable(e.to_string()))
    }

    async fn event_stream(&self, index: u64) -> Result<EventBody, ApiError> {
        let request = self.request(reqwest::Method::GET, "event/stream").query(&[
            ("index", index.to_string().as_str()),
            ("topic", "Job"),
            ("topic", "Allocation"),
            ("topic", "Evaluation"),
        ]);
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        if !status.is_success() {
            let body = read_bounded(response).await.unwrap_or_default();
            return Err(ApiError::Status {
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(response.bytes_stream().map_err(unreachable).boxed())
    }
}

/// A shared [`NomadApi`].
pub type SharedApi = Arc<dyn NomadApi>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nomad_client_rs_represents_poseidons_jobs_without_loss() {
        let spec = runner_core::EnvironmentSpec {
            id: runner_core::EnvironmentId::new(3).unwrap(),
            image: "img".into(),
            prewarming_pool_size: 2,
            cpu_limit: 20,
            memory_limit: 128,
            network_access: true,
            exposed_ports: vec![80],
        };
        let shape = crate::jobs::JobShape::default();
        assert!(HttpNomadApi::typed_without_loss(&shape.template(&spec)).is_some());
        let runner = runner_core::RunnerId::new("3-x");
        let mut job = shape.runner(&spec, &runner, true);
        assert!(HttpNomadApi::typed_without_loss(&job).is_some());
        // A field the crate does not model sends the job through the own code.
        job["VersionTag"] = serde_json::json!({"Name": "x"});
        assert!(HttpNomadApi::typed_without_loss(&job).is_none());
    }

    #[test]
    fn ids_are_path_escaped() {
        assert_eq!(escape("10-abc_def"), "10-abc_def");
        assert_eq!(escape("a/b c"), "a%2Fb%20c");
    }
}
