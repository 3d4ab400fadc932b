//! The event stream's wire format and resume rules (nomad.md §1.9), without I/O: an NDJSON
//! line decoder with a bounded line length, a tolerant batch parser, and the [`Cursor`] that
//! resumes from `last index + 1`, drops batches already seen and notices gaps.

use serde_json::Value;

/// Longest line kept; a longer one is skipped (and treated as a gap, since its events are lost).
pub const MAX_LINE: usize = 32 << 20;

/// Splits a byte stream into lines.
#[derive(Debug, Default)]
pub struct LineDecoder {
    buf: Vec<u8>,
    skipping: bool,
}

/// One decoded line.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// A complete line (without the newline).
    Complete(Vec<u8>),
    /// A line longer than [`MAX_LINE`] was dropped.
    Overlong,
}

impl LineDecoder {
    /// Feeds `chunk`, returning the lines it completed.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        while let Some(at) = chunk.iter().position(|b| *b == b'\n') {
            if self.skipping {
                self.skipping = false;
            } else {
                self.buf.extend_from_slice(&chunk[..at]);
                if self.buf.len() > MAX_LINE {
                    out.push(Line::Overlong);
                } else {
                    out.push(Line::Complete(std::mem::take(&mut self.buf)));
                }
            }
            self.buf.clear();
            chunk = &chunk[at + 1..];
        }
        if !self.skipping {
            self.buf.extend_from_slice(chunk);
            if self.buf.len() > MAX_LINE {
                self.buf = Vec::new();
                self.skipping = true;
                out.push(Line::Overlong);
            }
        }
        out
    }
}

/// One event of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `Job`, `Allocation`, `Evaluation`, …
    pub topic: String,
    /// The raft message type (`JobRegistered`, `PlanResult`, `AllocationUpdated`, …).
    pub kind: String,
    /// The object's key (job id, allocation id, evaluation id).
    pub key: String,
    /// The payload object (`{"Allocation": …}`, `{"Job": …, "Deleted": true}`, …).
    pub payload: Value,
}

/// One line of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// `{}`: a heartbeat.
    Heartbeat,
    /// `{"Index": n, "Events": [...]}`.
    Batch {
        /// The raft index.
        index: u64,
        /// Its events that could be read (an unreadable one is skipped, not fatal).
        events: Vec<Event>,
    },
    /// A line that is not JSON or has no index; the stream goes on.
    Malformed(String),
}

/// Parses one line tolerantly.
pub fn parse_line(line: &[u8]) -> Item {
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Item::Malformed(format!("not JSON: {e}")),
    };
    let Some(object) = value.as_object() else {
        return Item::Malformed("not an object".into());
    };
    let events = object.get("Events").and_then(Value::as_array);
    let index = object.get("Index").and_then(Value::as_u64).unwrap_or(0);
    if index == 0 && events.is_none_or(|e| e.is_empty()) {
        return Item::Heartbeat;
    }
    if index == 0 {
        return Item::Malformed("a batch without an index".into());
    }
    let events = events
        .map(|events| {
            events
                .iter()
                .filter_map(|e| {
                    Some(Event {
                        topic: e.get("Topic")?.as_str()?.to_string(),
                        kind: e.get("Type").and_then(Value::as_str).unwrap_or("").into(),
                        key: e.get("Key").and_then(Value::as_str).unwrap_or("").into(),
                        payload: e.get("Payload").filter(|p| p.is_object())?.clone(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Item::Batch { index, events }
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New: apply it.
    Fresh,
    /// Already applied (a replay after resuming): drop it.
    Duplicate,
    /// New, but batches before it were missed: apply it and resynchronise.
    AfterGap,
}

/// The resume position of the stream.
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    last: u64,
    resumed_at: Option<u64>,
}

impl Cursor {
    /// The index to subscribe with: `0` at first (replay the buffer), else `last + 1`.
    pub fn next_index(&self) -> u64 {
        if self.last == 0 { 0 } else { self.last + 1 }
    }

    /// The highest index applied.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// A new subscription was opened with `index`.
    pub fn subscribed(&mut self, index: u64) {
        self.resumed_at = (index > 0).then_some(index);
    }

    /// Judges the batch `index`.
    pub fn accept(&mut self, index: u64) -> Verdict {
        if index <= self.last {
            return Verdict::Duplicate;
        }
        self.last = index;
        match self.resumed_at.take() {
            Some(requested) if index > requested => Verdict::AfterGap,
            _ => Verdict::Fresh,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_chunks_and_overlong_ones_skipped() {
        let mut d = LineDecoder::default();
        assert!(d.push(b"{}\n{\"Ind").len() == 1);
        assert_eq!(
            d.push(b"ex\":1}\n"),
            vec![Line::Complete(b"{\"Index\":1}".to_vec())]
        );
        let big = vec![b'x'; MAX_LINE + 1];
        assert_eq!(d.push(&big), vec![Line::Overlong]);
        assert!(d.push(b"yyyy").is_empty());
        assert_eq!(d.push(b"y\n{}\n"), vec![Line::Complete(b"{}".to_vec())]);
    }

    #[test]
    fn heartbeats_batches_and_bad_events_are_told_apart() {
        assert_eq!(parse_line(b"{}"), Item::Heartbeat);
        assert!(matches!(parse_line(b"nonsense"), Item::Malformed(_)));
        let line = br#"{"Index":7,"Events":[
            {"Topic":"Job","Type":"JobRegistered","Key":"10-a","Payload":{"Job":{"ID":"10-a"}}},
            {"Topic":"Allocation","Payload":"not an object"},
            {"Type":"no topic"}]}"#;
        match parse_line(line) {
            Item::Batch { index, events } => {
                assert_eq!(index, 7);
                assert_eq!(events.len(), 1);
                assert_eq!(events[0].key, "10-a");
                assert_eq!(events[0].kind, "JobRegistered");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resuming_drops_seen_batches_and_notices_gaps() {
        let mut c = Cursor::default();
        assert_eq!(c.next_index(), 0);
        c.subscribed(0);
        assert_eq!(c.accept(5), Verdict::Fresh);
        assert_eq!(c.accept(6), Verdict::Fresh);
        assert_eq!(c.next_index(), 7);
        // Resumed at 7; the server answers from 7: no gap, and a replayed 6 is dropped.
        c.subscribed(7);
        assert_eq!(c.accept(6), Verdict::Duplicate);
        assert_eq!(c.accept(7), Verdict::Fresh);
        assert_eq!(c.accept(8), Verdict::Fresh);
        // Resumed at 9, but 9..11 are no longer buffered.
        c.subscribed(9);
        assert_eq!(c.accept(12), Verdict::AfterGap);
        assert_eq!(c.accept(13), Verdict::Fresh);
        assert_eq!(c.last(), 13);
    }
}
