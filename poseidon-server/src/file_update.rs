//! Reading a `PATCH /runners/{id}/files` body straight into a [`FileUpdate`], with a bound on
//! its number of entries.
//!
//! The body is deserialized in one pass with serde visitors rather than through a
//! [`serde_json::Value`] tree: a tree costs tens of bytes per entry on top of the entry itself,
//! and a 24 MB body of six million one-letter paths made the server grow by gigabytes. The
//! visitors count `delete` and `copy` entries together as they go and stop at the first one
//! over the cap, so a request that is too large is refused before it is built. Every rejection
//! names the field at fault, as the rest of the API's input does.

use std::cell::{Cell, RefCell};
use std::fmt;

use bytes::Bytes;
use runner_core::{FileCopy, FileUpdate};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::ApiError;
use crate::input;

/// Default for `limits.maxfileentries`: most `delete` plus `copy` entries in one request.
pub const DEFAULT_MAX_FILE_ENTRIES: usize = 50_000;

/// Parses `body` into a [`FileUpdate`] of at most `max_entries` entries (deletions and copies
/// together). Missing or `null` arrays are empty; unknown keys are ignored.
pub fn parse_file_update(body: &[u8], max_entries: usize) -> Result<FileUpdate, ApiError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(ApiError::BadRequest("request body is empty".into())),
        Some(b'{') => {}
        Some(_) => {
            return Err(ApiError::BadRequest(
                "request body must be a JSON object".into(),
            ));
        }
    }
    let context = Context {
        max_entries,
        entries: Cell::new(0),
        problem: RefCell::new(None),
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = Body(&context)
        .deserialize(&mut deserializer)
        .and_then(|update| deserializer.end().map(|()| update));
    match (parsed, context.problem.into_inner()) {
        (_, Some(problem)) => Err(problem),
        (Ok(update), None) => Ok(update),
        (Err(e), None) => Err(ApiError::BadRequest(format!("invalid JSON: {e}"))),
    }
}

/// What the visitors share: the entry count and the first problem found (reported instead of
/// serde's own message, which does not know the API's field names).
struct Context {
    max_entries: usize,
    entries: Cell<usize>,
    problem: RefCell<Option<ApiError>>,
}

impl Context {
    /// Records `problem` and returns the error that stops the parser.
    fn fail<E: de::Error>(&self, problem: ApiError) -> E {
        let message = problem.to_string();
        self.problem.borrow_mut().get_or_insert(problem);
        E::custom(message)
    }

    fn field<E: de::Error>(&self, field: &str, problem: &str) -> E {
        self.fail(ApiError::field(field, problem))
    }

    /// Counts one more entry; fails once there are more than the cap.
    fn count<E: de::Error>(&self) -> Result<(), E> {
        let n = self.entries.get() + 1;
        self.entries.set(n);
        if n > self.max_entries {
            return Err(self.fail(ApiError::BadRequest(format!(
                "too many entries: a file request may have at most {} delete and copy entries together",
                self.max_entries
            ))));
        }
        Ok(())
    }
}

/// The top-level object.
struct Body<'c>(&'c Context);

impl<'de> DeserializeSeed<'de> for Body<'_> {
    type Value = FileUpdate;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<FileUpdate, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Body<'_> {
    type Value = FileUpdate;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FileUpdate, A::Error> {
        let mut update = FileUpdate::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Delete => update.delete = map.next_value_seed(Deletes(self.0))?,
                Key::Copy => update.copy = map.next_value_seed(Copies(self.0))?,
                Key::Path | Key::Content | Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(update)
    }
}

/// The keys the visitors look at; any other is skipped.
enum Key {
    Delete,
    Copy,
    Path,
    Content,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "delete" => Key::Delete,
                    "copy" => Key::Copy,
                    "path" => Key::Path,
                    "content" => Key::Content,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

/// `delete`: an array of paths, or `null`.
struct Deletes<'c>(&'c Context);

impl<'de> DeserializeSeed<'de> for Deletes<'_> {
    type Value = Vec<String>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Deletes<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of paths")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Vec<String>, E> {
        Ok(Vec::new())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut paths = Vec::new();
        loop {
            let field = format!("delete[{}]", paths.len());
            let Some(path) = seq.next_element_seed(Text {
                context: self.0,
                field: &field,
                required: "must be a string",
            })?
            else {
                return Ok(paths);
            };
            self.0.count()?;
            let path = path.ok_or_else(|| self.0.field(&field, "must be a string"))?;
            input::file_path(&path, &field).map_err(|e| self.0.fail(e))?;
            paths.push(path);
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Vec<String>, E> {
        Err(self.0.field("delete", "must be an array of paths"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Vec<String>, E> {
        Err(self.0.field("delete", "must be an array of paths"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Vec<String>, E> {
        Err(self.0.field("delete", "must be an array of paths"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Vec<String>, E> {
        Err(self.0.field("delete", "must be an array of paths"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Vec<String>, E> {
        Err(self.0.field("delete", "must be an array of paths"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Vec<String>, A::Error> {
        Err(self.0.field("delete", "must be an array of paths"))
    }
}

/// A string value: `Some(text)`, or `None` for `null`; any other type fails naming `field`.
struct Text<'c, 'f> {
    context: &'c Context,
    field: &'f str,
    required: &'static str,
}

impl<'de> DeserializeSeed<'de> for Text<'_, '_> {
    type Value = Option<String>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Text<'_, '_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Option<String>, E> {
        Ok(Some(text.to_string()))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Option<String>, E> {
        Ok(Some(text))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<String>, E> {
        Err(self.context.field(self.field, self.required))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Option<String>, E> {
        Err(self.context.field(self.field, self.required))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Option<String>, E> {
        Err(self.context.field(self.field, self.required))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<String>, E> {
        Err(self.context.field(self.field, self.required))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Option<String>, A::Error> {
        Err(self.context.field(self.field, self.required))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Option<String>, A::Error> {
        Err(self.context.field(self.field, self.required))
    }
}

/// `copy`: an array of `{"path","content"}` objects, or `null`.
struct Copies<'c>(&'c Context);

impl<'de> DeserializeSeed<'de> for Copies<'_> {
    type Value = Vec<FileCopy>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<FileCopy>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Copies<'_> {
    type Value = Vec<FileCopy>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of files")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Vec<FileCopy>, E> {
        Ok(Vec::new())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<FileCopy>, A::Error> {
        let mut files = Vec::new();
        loop {
            let entry = CopyEntry {
                context: self.0,
                index: files.len(),
            };
            let Some(file) = seq.next_element_seed(entry)? else {
                return Ok(files);
            };
            self.0.count()?;
            files.push(file);
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Vec<FileCopy>, E> {
        Err(self.0.field("copy", "must be an array of files"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Vec<FileCopy>, E> {
        Err(self.0.field("copy", "must be an array of files"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Vec<FileCopy>, E> {
        Err(self.0.field("copy", "must be an array of files"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Vec<FileCopy>, E> {
        Err(self.0.field("copy", "must be an array of files"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Vec<FileCopy>, E> {
        Err(self.0.field("copy", "must be an array of files"))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Vec<FileCopy>, A::Error> {
        Err(self.0.field("copy", "must be an array of files"))
    }
}

/// One `copy` entry.
struct CopyEntry<'c> {
    context: &'c Context,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for CopyEntry<'_> {
    type Value = FileCopy;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<FileCopy, D::Error> {
        d.deserialize_any(self)
    }
}

impl CopyEntry<'_> {
    fn not_an_object<E: de::Error>(&self) -> E {
        self.context
            .field(&format!("copy[{}]", self.index), "must be an object")
    }
}

impl<'de> Visitor<'de> for CopyEntry<'_> {
    type Value = FileCopy;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a file object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FileCopy, A::Error> {
        let path_field = format!("copy[{}].path", self.index);
        let content_field = format!("copy[{}].content", self.index);
        let mut path = None;
        let mut content = Bytes::new();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Path => {
                    path = map.next_value_seed(Text {
                        context: self.context,
                        field: &path_field,
                        required: "must be a string",
                    })?;
                }
                Key::Content => {
                    let text = map.next_value_seed(Text {
                        context: self.context,
                        field: &content_field,
                        required: "must be a base64 string",
                    })?;
                    content = match text {
                        None => Bytes::new(),
                        Some(text) => decode_base64(&text).map(Bytes::from).ok_or_else(|| {
                            self.context.field(&content_field, "must be valid base64")
                        })?,
                    };
                }
                Key::Delete | Key::Copy | Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let path = path.ok_or_else(|| self.context.field(&path_field, "is required"))?;
        input::file_path(&path, &path_field).map_err(|e| self.context.fail(e))?;
        Ok(FileCopy { path, content })
    }

    fn visit_unit<E: de::Error>(self) -> Result<FileCopy, E> {
        Err(self.not_an_object())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<FileCopy, E> {
        Err(self.not_an_object())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<FileCopy, E> {
        Err(self.not_an_object())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<FileCopy, E> {
        Err(self.not_an_object())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<FileCopy, E> {
        Err(self.not_an_object())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<FileCopy, E> {
        Err(self.not_an_object())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<FileCopy, A::Error> {
        Err(self.not_an_object())
    }
}

/// Standard base64, padded or not (Poseidon's clients send padded; some tools strip it).
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    engine.decode(text).ok().or_else(|| {
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(text)
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str, max: usize) -> String {
        parse_file_update(body.as_bytes(), max)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn file_updates_decode_base64_and_name_bad_entries() {
        let u = parse_file_update(
            br#"{"delete":["a"],"copy":[{"path":"x","content":"aGk="},{"path":"d/"},{"content":null,"path":"y","other":[1]}],"extra":{}}"#,
            10,
        )
        .expect("valid");
        assert_eq!(u.delete, vec!["a".to_string()]);
        assert_eq!(u.copy[0].content, Bytes::from_static(b"hi"));
        assert!(u.copy[1].content.is_empty());
        assert_eq!(u.copy[2].path, "y");
        let e = |b: &str| err(b, 10);
        assert!(e(r#"{"copy":[{"path":"x","content":"!!"}]}"#).starts_with("copy[0].content"));
        assert!(e(r#"{"copy":[{"path":"x","content":5}]}"#).starts_with("copy[0].content"));
        assert!(e(r#"{"copy":[{"content":"aGk="}]}"#).starts_with("copy[0].path: is required"));
        assert!(e(r#"{"copy":[{"path":""}]}"#).starts_with("copy[0].path"));
        assert!(e(r#"{"copy":[{"path":"a"},7]}"#).starts_with("copy[1]: must be an object"));
        assert!(e(r#"{"copy":{}}"#).starts_with("copy: must be an array"));
        assert!(e(r#"{"delete":[1]}"#).starts_with("delete[0]: must be a string"));
        assert!(e(r#"{"delete":["a",null]}"#).starts_with("delete[1]: must be a string"));
        assert!(e(r#"{"delete":"a"}"#).starts_with("delete: must be an array"));
        assert!(e(r#"{"delete":["a\u0000"]}"#).starts_with("delete[0]"));
        assert!(e("").contains("empty"));
        assert!(e("[]").contains("JSON object"));
        assert!(e(r#"{"delete":["a"]"#).starts_with("invalid JSON"));
        assert!(e(r#"{"delete":["a"]} x"#).starts_with("invalid JSON"));
        let u = parse_file_update(br#"{"delete":null,"copy":null}"#, 10).expect("nulls");
        assert!(u.delete.is_empty() && u.copy.is_empty());
    }

    #[test]
    fn entries_are_counted_together_and_the_cap_is_exact() {
        assert!(parse_file_update(br#"{"delete":["a","b"],"copy":[{"path":"c"}]}"#, 3).is_ok());
        let e = err(
            r#"{"delete":["a","b"],"copy":[{"path":"c"},{"path":"d"}]}"#,
            3,
        );
        assert!(e.contains("at most 3"), "{e}");
        let e = err(r#"{"delete":["a","b","c","d"]}"#, 3);
        assert!(e.contains("at most 3"), "{e}");
        assert!(parse_file_update(br#"{"copy":[]}"#, 0).is_ok());
    }

    #[test]
    fn the_cap_stops_parsing_before_the_rest_of_the_body() {
        // Everything after the entry over the cap is never looked at: here it is not even JSON.
        let e = err(r#"{"delete":["a","b","c" this is not JSON"#, 2);
        assert!(e.contains("at most 2"), "{e}");
    }
}
