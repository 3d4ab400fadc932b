//! The event broker (nomad.md §1.9, §5.6): one batch per raft index, a bounded ring buffer for
//! replay, and bounded per-subscriber channels whose overflow drops the subscriber.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One event of a batch, in Nomad's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Event {
    /// `Job`, `Evaluation`, `Allocation` or `Node`.
    pub topic: String,
    /// The raft message that produced it (`JobRegistered`, `PlanResult`, …).
    #[serde(rename = "Type")]
    pub event_type: String,
    /// The object's ID.
    pub key: String,
    /// The object's namespace (`""` for nodes).
    pub namespace: String,
    /// `[JobID, DeploymentID]` for allocations and evaluations, `null` otherwise.
    pub filter_keys: Option<Vec<String>>,
    /// The raft index of the batch.
    pub index: u64,
    /// `{"Job": …}`, `{"Allocation": …}`, `{"Evaluation": …}` or `{"Node": …}`.
    pub payload: Value,
}

/// Every event of one raft index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EventBatch {
    /// The raft index.
    pub index: u64,
    /// Its events, ordered by the last write to each object.
    pub events: Vec<Event>,
}

/// Which events a subscriber wants.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    /// `None`: every namespace (`*`).
    pub namespaces: Option<BTreeSet<String>>,
    /// Topic (or `*`) to keys (or `*`).
    pub topics: BTreeMap<String, BTreeSet<String>>,
}

impl Filter {
    /// Parses the `topic` query values; `Err` carries Nomad's 400 text.
    pub fn parse_topics(values: &[String]) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
        let mut topics: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        if values.is_empty() {
            topics.entry("*".into()).or_default().insert("*".into());
        }
        for v in values {
            let parts: Vec<&str> = v.split(':').collect();
            let (topic, key) = match parts.as_slice() {
                [t] => (*t, "*"),
                [t, k] => (*t, *k),
                _ => {
                    return Err(format!(
                        "Invalid topic query: Invalid key value pair for topic: {v}"
                    ));
                }
            };
            if topic.is_empty() || key.is_empty() {
                return Err(format!(
                    "Invalid topic query: Invalid key value pair for topic: {v}"
                ));
            }
            topics
                .entry(topic.to_owned())
                .or_default()
                .insert(key.to_owned());
        }
        Ok(topics)
    }

    fn matches(&self, e: &Event) -> bool {
        let ns_ok = e.namespace.is_empty()
            || self
                .namespaces
                .as_ref()
                .is_none_or(|ns| ns.contains(&e.namespace));
        if !ns_ok {
            return false;
        }
        let key_ok = |keys: &BTreeSet<String>| {
            keys.contains("*")
                || keys.contains(&e.key)
                || e.filter_keys.iter().flatten().any(|k| keys.contains(k))
        };
        self.topics.get("*").is_some_and(key_ok) || self.topics.get(&e.topic).is_some_and(key_ok)
    }

    /// The part of `batch` this filter lets through, if any.
    fn apply(&self, batch: &Arc<EventBatch>) -> Option<Arc<EventBatch>> {
        let kept: Vec<Event> = batch
            .events
            .iter()
            .filter(|e| self.matches(e))
            .cloned()
            .collect();
        if kept.is_empty() {
            None
        } else if kept.len() == batch.events.len() {
            Some(batch.clone())
        } else {
            Some(Arc::new(EventBatch {
                index: batch.index,
                events: kept,
            }))
        }
    }
}

struct Subscriber {
    filter: Filter,
    tx: mpsc::Sender<Arc<EventBatch>>,
    abort: CancellationToken,
}

/// What a new subscriber gets: the replay from the buffer, then live batches.
#[derive(Debug)]
pub(crate) struct Subscription {
    /// Buffered batches from the requested index on.
    pub replay: VecDeque<Arc<EventBatch>>,
    /// Live batches.
    pub rx: mpsc::Receiver<Arc<EventBatch>>,
    /// Cancelled when the stream must end abruptly (drop fault, overflow, restart).
    pub abort: CancellationToken,
}

/// The ring buffer and the subscribers.
pub(crate) struct Broker {
    buffer: VecDeque<Arc<EventBatch>>,
    capacity: usize,
    subscriber_buffer: usize,
    subscribers: Vec<Subscriber>,
    /// Every batch ever published, for `Control::events` (bounded by `history_limit`).
    history: VecDeque<Arc<EventBatch>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("buffered", &self.buffer.len())
            .field("subscribers", &self.subscribers.len())
            .finish()
    }
}

/// How many batches `Control::events` keeps.
const HISTORY_LIMIT: usize = 100_000;

impl Broker {
    /// A broker holding `capacity` indexes, with `subscriber_buffer` batches per subscriber.
    pub fn new(capacity: usize, subscriber_buffer: usize) -> Self {
        Self {
            buffer: VecDeque::new(),
            capacity: capacity.max(1),
            subscriber_buffer: subscriber_buffer.max(1),
            subscribers: Vec::new(),
            history: VecDeque::new(),
        }
    }

    /// Buffers `batch` and hands it to every subscriber it matches; a subscriber whose channel
    /// is full is dropped (its stream ends abruptly).
    pub fn publish(&mut self, batch: EventBatch) {
        let batch = Arc::new(batch);
        self.buffer.push_back(batch.clone());
        while self.buffer.len() > self.capacity {
            self.buffer.pop_front();
        }
        self.history.push_back(batch.clone());
        while self.history.len() > HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.subscribers.retain(|s| {
            if s.abort.is_cancelled() {
                return false;
            }
            let Some(b) = s.filter.apply(&batch) else {
                return !s.tx.is_closed();
            };
            match s.tx.try_send(b) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!("event subscriber fell behind; dropping it");
                    s.abort.cancel();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Subscribes from `index` (0: the oldest buffered batch; else the first with `Index >= index`).
    pub fn subscribe(&mut self, filter: Filter, index: u64) -> Subscription {
        let replay = self
            .buffer
            .iter()
            .filter(|b| b.index >= index)
            .filter_map(|b| filter.apply(b))
            .collect();
        let (tx, rx) = mpsc::channel(self.subscriber_buffer);
        let abort = CancellationToken::new();
        self.subscribers.push(Subscriber {
            filter,
            tx,
            abort: abort.clone(),
        });
        Subscription { replay, rx, abort }
    }

    /// Ends every subscriber's stream abruptly.
    pub fn drop_all(&mut self) {
        for s in self.subscribers.drain(..) {
            s.abort.cancel();
        }
    }

    /// Forgets the buffered batches (a resume then starts at the oldest batch still available).
    pub fn truncate(&mut self) {
        self.buffer.clear();
    }

    /// Every batch published since start (up to a large limit).
    pub fn history(&self) -> Vec<EventBatch> {
        self.history.iter().map(|b| (**b).clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(topic: &str, key: &str, ns: &str, fk: Option<&str>) -> Event {
        Event {
            topic: topic.into(),
            event_type: "T".into(),
            key: key.into(),
            namespace: ns.into(),
            filter_keys: fk.map(|k| vec![k.to_owned(), String::new()]),
            index: 1,
            payload: Value::Null,
        }
    }

    #[test]
    fn topic_parsing_and_matching() {
        assert!(Filter::parse_topics(&["Job:a:b".into()]).is_err());
        let f = Filter {
            namespaces: Some(["default".to_owned()].into()),
            topics: Filter::parse_topics(&["Allocation:job1".into(), "Job".into()]).unwrap(),
        };
        assert!(f.matches(&ev("Allocation", "x", "default", Some("job1"))));
        assert!(!f.matches(&ev("Allocation", "x", "default", Some("job2"))));
        assert!(f.matches(&ev("Job", "any", "default", None)));
        assert!(!f.matches(&ev("Job", "any", "other", None)));
        assert!(!f.matches(&ev("Evaluation", "e", "default", None)));
    }

    #[test]
    fn overflow_drops_the_subscriber_and_buffer_is_bounded() {
        let mut b = Broker::new(3, 1);
        let sub = b.subscribe(Filter::default(), 0);
        let all = Filter {
            namespaces: None,
            topics: Filter::parse_topics(&[]).unwrap(),
        };
        let sub2 = b.subscribe(all, 0);
        for i in 1..=5 {
            b.publish(EventBatch {
                index: i,
                events: vec![ev("Job", "j", "default", None)],
            });
        }
        assert!(sub2.abort.is_cancelled());
        assert!(
            !sub.abort.is_cancelled(),
            "the empty filter matches nothing"
        );
        let s3 = b.subscribe(
            Filter {
                namespaces: None,
                topics: Filter::parse_topics(&[]).unwrap(),
            },
            0,
        );
        assert_eq!(
            s3.replay.iter().map(|b| b.index).collect::<Vec<_>>(),
            [3, 4, 5]
        );
    }
}
