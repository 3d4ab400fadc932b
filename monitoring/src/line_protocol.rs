//! InfluxDB line protocol: `measurement,tag=v field=1i,other="text" 1700000000000000000`.
//!
//! Escaping follows the InfluxDB v2 reference: in measurement names commas and spaces are
//! escaped with a backslash; in tag keys, tag values and field keys commas, equals signs and
//! spaces are; in string field values double quotes and backslashes are. Line breaks cannot be
//! escaped in line protocol, so they are written as the two characters `\n` (a point can never
//! split into two lines, whatever a client puts into a tag).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a [`Point`] has no line-protocol form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The measurement name is empty.
    #[error("the measurement name is empty")]
    EmptyMeasurement,
    /// Line protocol needs at least one field.
    #[error("point `{0}` has no fields")]
    NoFields(String),
    /// A float field is NaN or infinite, which line protocol cannot express.
    #[error("field `{field}` of point `{measurement}` is not a finite number")]
    NonFiniteFloat {
        /// The point's measurement.
        measurement: String,
        /// The field at fault.
        field: String,
    },
}

/// A field value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// A signed integer, written with the `i` suffix (`duration=1500i`).
    Integer(i64),
    /// A float (`ratio=0.5`); must be finite.
    Float(f64),
    /// A boolean (`ok=true`).
    Boolean(bool),
    /// A string, written quoted with `"` and `\` escaped.
    String(String),
}

impl From<i64> for FieldValue {
    fn from(v: i64) -> Self {
        Self::Integer(v)
    }
}

impl From<u32> for FieldValue {
    fn from(v: u32) -> Self {
        Self::Integer(i64::from(v))
    }
}

impl From<u64> for FieldValue {
    /// Saturates at `i64::MAX` (line protocol's unsigned type needs a server option).
    fn from(v: u64) -> Self {
        Self::Integer(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<f64> for FieldValue {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

impl From<bool> for FieldValue {
    fn from(v: bool) -> Self {
        Self::Boolean(v)
    }
}

impl From<&str> for FieldValue {
    fn from(v: &str) -> Self {
        Self::String(v.to_string())
    }
}

impl From<String> for FieldValue {
    fn from(v: String) -> Self {
        Self::String(v)
    }
}

/// One data point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The measurement name (e.g. `poseidon_/health`).
    pub measurement: String,
    /// Tags (indexed strings); a tag with an empty value is left out of the line, as InfluxDB
    /// refuses empty tag values.
    pub tags: BTreeMap<String, String>,
    /// Fields; at least one is required.
    pub fields: BTreeMap<String, FieldValue>,
    /// Nanoseconds since the Unix epoch; `None` lets the server stamp the point on arrival.
    pub timestamp: Option<i64>,
}

impl Point {
    /// A point in `measurement` stamped with the current time and without tags or fields.
    pub fn new(measurement: impl Into<String>) -> Self {
        Self {
            measurement: measurement.into(),
            tags: BTreeMap::new(),
            fields: BTreeMap::new(),
            timestamp: Some(now_ns()),
        }
    }

    /// Adds (or replaces) a tag.
    #[must_use]
    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value.into());
        self
    }

    /// Adds (or replaces) a field.
    #[must_use]
    pub fn field(mut self, key: impl Into<String>, value: impl Into<FieldValue>) -> Self {
        self.fields.insert(key.into(), value.into());
        self
    }

    /// Sets the timestamp in nanoseconds since the Unix epoch (`None`: the server's time).
    #[must_use]
    pub fn timestamp(mut self, ns: Option<i64>) -> Self {
        self.timestamp = ns;
        self
    }

    /// The point as one line of line protocol, without the trailing newline.
    pub fn to_line(&self) -> Result<String, EncodeError> {
        if self.measurement.is_empty() {
            return Err(EncodeError::EmptyMeasurement);
        }
        if self.fields.is_empty() {
            return Err(EncodeError::NoFields(self.measurement.clone()));
        }
        let mut line = String::with_capacity(64);
        escape_into(&mut line, &self.measurement, &[',', ' ']);
        for (key, value) in &self.tags {
            if key.is_empty() || value.is_empty() {
                continue;
            }
            line.push(',');
            escape_into(&mut line, key, &[',', '=', ' ']);
            line.push('=');
            escape_into(&mut line, value, &[',', '=', ' ']);
        }
        let mut separator = ' ';
        for (key, value) in &self.fields {
            line.push(separator);
            separator = ',';
            escape_into(&mut line, key, &[',', '=', ' ']);
            line.push('=');
            match value {
                FieldValue::Integer(v) => {
                    let _ = write!(line, "{v}i");
                }
                FieldValue::Float(v) => {
                    if !v.is_finite() {
                        return Err(EncodeError::NonFiniteFloat {
                            measurement: self.measurement.clone(),
                            field: key.clone(),
                        });
                    }
                    let _ = write!(line, "{v}");
                }
                FieldValue::Boolean(v) => {
                    let _ = write!(line, "{v}");
                }
                FieldValue::String(v) => {
                    line.push('"');
                    escape_into(&mut line, v, &['"', '\\']);
                    line.push('"');
                }
            }
        }
        if let Some(ns) = self.timestamp {
            let _ = write!(line, " {ns}");
        }
        Ok(line)
    }
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it, saturating far in future).
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn escape_into(out: &mut String, text: &str, special: &[char]) {
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if special.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(p: &Point) -> String {
        p.to_line().expect("encodable")
    }

    #[test]
    fn a_simple_point() {
        let p = Point::new("poseidon_/health")
            .tag("status", "204")
            .tag("stage", "prod")
            .field("duration", 1500_i64)
            .timestamp(Some(1_700_000_000_000_000_000));
        assert_eq!(
            line(&p),
            "poseidon_/health,stage=prod,status=204 duration=1500i 1700000000000000000"
        );
    }

    #[test]
    fn measurement_escapes_commas_and_spaces_but_not_equals() {
        let p = Point::new("a b,c=d").field("f", 1_i64).timestamp(None);
        assert_eq!(line(&p), r"a\ b\,c=d f=1i");
    }

    #[test]
    fn tag_keys_values_and_field_keys_escape_commas_equals_and_spaces() {
        let p = Point::new("m")
            .tag("k ey,=", "v al,u=e")
            .field("f i,e=ld", 2_i64)
            .timestamp(None);
        assert_eq!(line(&p), r"m,k\ ey\,\==v\ al\,u\=e f\ i\,e\=ld=2i");
    }

    #[test]
    fn string_fields_are_quoted_with_quotes_and_backslashes_escaped() {
        let p = Point::new("m")
            .field("s", r#"say "hi" \ bye, a=b"#)
            .timestamp(None);
        assert_eq!(line(&p), r#"m s="say \"hi\" \\ bye, a=b""#);
    }

    #[test]
    fn value_types() {
        let p = Point::new("m")
            .field("a", -3_i64)
            .field("b", 0.5)
            .field("c", true)
            .field("d", 7_u32)
            .field("e", u64::MAX)
            .timestamp(Some(5));
        assert_eq!(
            line(&p),
            format!("m a=-3i,b=0.5,c=true,d=7i,e={}i 5", i64::MAX)
        );
    }

    #[test]
    fn line_breaks_never_split_a_point() {
        let p = Point::new("m\nx")
            .tag("t", "a\nb")
            .field("s", "x\ny")
            .timestamp(None);
        let l = line(&p);
        assert!(!l.contains('\n'), "{l}");
        assert_eq!(l, r#"m\nx,t=a\nb s="x\ny""#);
    }

    #[test]
    fn empty_tags_are_left_out() {
        let p = Point::new("m")
            .tag("stage", "")
            .field("f", 1_i64)
            .timestamp(None);
        assert_eq!(line(&p), "m f=1i");
    }

    #[test]
    fn unencodable_points_are_errors() {
        assert_eq!(
            Point::new("").field("f", 1_i64).to_line(),
            Err(EncodeError::EmptyMeasurement)
        );
        assert_eq!(
            Point::new("m").to_line(),
            Err(EncodeError::NoFields("m".into()))
        );
        assert!(matches!(
            Point::new("m").field("f", f64::NAN).to_line(),
            Err(EncodeError::NonFiniteFloat { .. })
        ));
    }

    #[test]
    fn new_points_are_stamped_now() {
        let before = now_ns();
        let p = Point::new("m");
        assert!(p.timestamp.is_some_and(|t| t >= before && t > 0));
    }
}
