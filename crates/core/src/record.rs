//! Records and the requests the engine sends to the tiers.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{CollectionName, IndexName, RecordId, Version};

/// The data of a record: always a JSON object.
pub type JsonObject = serde_json::Map<String, serde_json::Value>;

/// How deep record data may nest, the top-level object being level 1.
/// JSON readers here stop at 128 levels (serde_json's recursion limit), and
/// an export line wraps a record in two more; a bound well inside that keeps
/// every accepted record exportable, restorable and importable.
pub const MAX_DATA_DEPTH: usize = 64;

/// Why `data` cannot be stored in every tier, if it cannot: what the service
/// accepts, each tier must hold, replay and export. PostgreSQL's `jsonb`
/// refuses the character U+0000 in any string (key or value), while Redis
/// and SQLite take it; accepting it would let one tier hold what another
/// never can. Data nested deeper than [`MAX_DATA_DEPTH`] would be stored but
/// could not be exported or restored.
pub fn unstorable(data: &JsonObject) -> Option<String> {
    fn at(path: &str) -> &str {
        if path.is_empty() { "/" } else { path }
    }
    fn walk(value: &serde_json::Value, path: &mut String, depth: usize) -> Option<String> {
        match value {
            serde_json::Value::String(text) if text.contains('\0') => Some(format!(
                "the string at {} contains U+0000, which cannot be stored",
                at(path)
            )),
            serde_json::Value::Array(items) => {
                if depth > MAX_DATA_DEPTH {
                    return Some(too_deep(path));
                }
                items.iter().enumerate().find_map(|(n, item)| {
                    let len = path.len();
                    path.push_str(&format!("/{n}"));
                    let found = walk(item, path, depth + 1);
                    path.truncate(len);
                    found
                })
            }
            serde_json::Value::Object(fields) => object(fields, path, depth),
            _ => None,
        }
    }
    fn too_deep(path: &str) -> String {
        format!(
            "the data nests deeper than {MAX_DATA_DEPTH} levels at {}",
            at(path)
        )
    }
    fn object(fields: &JsonObject, path: &mut String, depth: usize) -> Option<String> {
        if depth > MAX_DATA_DEPTH {
            return Some(too_deep(path));
        }
        fields.iter().find_map(|(name, value)| {
            if name.contains('\0') {
                return Some(format!(
                    "a field name in {} contains U+0000, which cannot be stored",
                    at(path)
                ));
            }
            let len = path.len();
            path.push('/');
            path.push_str(&name.replace('~', "~0").replace('/', "~1"));
            let found = walk(value, path, depth + 1);
            path.truncate(len);
            found
        })
    }
    object(data, &mut String::new(), 1)
}

#[cfg(test)]
mod depth_tests {
    use super::*;
    use serde_json::{Value, json};

    fn nested(levels: usize) -> JsonObject {
        // `levels` objects in all, the top-level one included.
        let mut value = json!({});
        for _ in 1..levels {
            value = json!({ "a": value });
        }
        match value {
            Value::Object(object) => object,
            _ => unreachable!(),
        }
    }

    #[test]
    fn data_may_nest_up_to_the_bound_and_no_deeper() {
        assert_eq!(unstorable(&nested(MAX_DATA_DEPTH)), None);
        let problem = unstorable(&nested(MAX_DATA_DEPTH + 1)).expect("too deep");
        assert!(problem.contains("deeper than 64 levels"), "{problem}");
        let mut in_array = nested(1);
        let mut inner = json!([1]);
        for _ in 1..MAX_DATA_DEPTH {
            inner = json!([inner]);
        }
        in_array.insert("list".into(), inner);
        assert!(unstorable(&in_array).is_some(), "arrays count as levels");
    }
}

/// Where a record lives: its collection and id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub collection: CollectionName,
    pub id: RecordId,
}

impl RecordKey {
    pub fn new(collection: CollectionName, id: RecordId) -> Self {
        Self { collection, id }
    }
}

/// A stored record, as both tiers hold it and as the API returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub collection: CollectionName,
    pub id: RecordId,
    pub version: Version,
    pub data: JsonObject,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(
        with = "time::serde::rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
}

impl Record {
    pub fn key(&self) -> RecordKey {
        RecordKey::new(self.collection.clone(), self.id.clone())
    }

    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// How long a cache may keep this record: `cache_ttl`, cut short by the
    /// record's own expiry. `None` when the record has already expired.
    pub fn cache_lifetime(&self, cache_ttl: Duration, now: OffsetDateTime) -> Option<Duration> {
        match self.expires_at {
            None => Some(cache_ttl),
            Some(at) if at > now => {
                let left = Duration::try_from(at - now).ok()?;
                Some(left.min(cache_ttl))
            }
            Some(_) => None,
        }
    }
}

/// A condition on the current state of a record, checked atomically with the
/// write it guards (HTTP `If-Match` / `If-None-Match: *`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precondition {
    #[default]
    None,
    /// The record exists with exactly this version.
    IfMatch(Version),
    /// The record exists, whatever its version (`If-Match: *`).
    Exists,
    /// The record does not exist (`If-None-Match: *`).
    Absent,
}

/// The longest `ttl` a client may give a record (ten years): a bound every
/// tier can add to a time without overflow.
pub const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

impl Precondition {
    /// Whether a write under this precondition may go ahead over a record
    /// whose live version is `live` (`None`: no live record). Every tier
    /// that checks preconditions in Rust asks this; the SQL of PostgreSQL
    /// and the Lua of Redis state the same rule in their own words.
    pub fn admits(self, live: Option<Version>) -> bool {
        match self {
            Precondition::None => true,
            Precondition::IfMatch(expected) => live == Some(expected),
            Precondition::Exists => live.is_some(),
            Precondition::Absent => live.is_none(),
        }
    }
}

/// One entry of a unique index: the indexed field's value as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub index: IndexName,
    pub value: String,
}

/// A complete, validated write of one record, ready for a tier.
///
/// The engine has already checked the schema and extracted the index entries; a
/// tier's only job is to apply it atomically: check the precondition, assign the
/// next version, store data and index entries, or change nothing.
#[derive(Clone, Debug)]
pub struct RecordWrite {
    pub key: RecordKey,
    pub data: JsonObject,
    /// `None` when the collection declares no unique index (nothing to maintain).
    pub index_entries: Option<Vec<IndexEntry>>,
    pub precondition: Precondition,
    pub expires_at: Option<OffsetDateTime>,
    /// Wall-clock time of the write: sets `updated_at` and feeds the version clock.
    pub now: OffsetDateTime,
}

/// What a write produced.
#[derive(Clone, Debug)]
pub struct WriteOutcome {
    pub record: Record,
    /// True when no live record existed before (HTTP 201 rather than 200).
    pub created: bool,
}

/// A keyset-paginated scan of one collection, ordered by id.
#[derive(Clone, Debug)]
pub struct ListQuery {
    pub collection: CollectionName,
    /// Only ids strictly greater than this.
    pub after: Option<RecordId>,
    /// Only ids starting with this (already validated as an id prefix).
    pub prefix: Option<String>,
    pub limit: u32,
    /// Most bytes of data a page holds (one record always fits): see
    /// [`PageBuilder`]. Tiers bound the page in their query, never by
    /// fetching `limit` rows and measuring them.
    pub max_bytes: usize,
    pub now: OffsetDateTime,
}

/// One page of a list: records in id order, and whether more follow.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub records: Vec<Record>,
    pub more: bool,
}

/// Builds a page from records offered in id order: at most `limit` records
/// and at most `max_bytes` of data, but always the first record. A tier
/// offers records until [`PageBuilder::offer`] says the page is complete,
/// so it knows whether more follow without fetching them all.
pub struct PageBuilder {
    limit: usize,
    max_bytes: usize,
    bytes: usize,
    page: ListPage,
}

impl PageBuilder {
    pub fn new(query: &ListQuery) -> Self {
        Self {
            limit: query.limit as usize,
            max_bytes: query.max_bytes,
            bytes: 0,
            page: ListPage::default(),
        }
    }

    /// Offers the next record and its data's size in bytes; false once the
    /// page is complete (this record and any after it belong to the next).
    pub fn offer(&mut self, record: Record, size: usize) -> bool {
        let full = self.page.records.len() >= self.limit
            || (!self.page.records.is_empty() && self.bytes + size > self.max_bytes);
        if full {
            self.page.more = true;
            return false;
        }
        self.bytes += size;
        self.page.records.push(record);
        true
    }

    pub fn finish(self) -> ListPage {
        self.page
    }
}

/// The length of `value` written as compact JSON, counted without writing it.
pub fn json_size(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Every id sorts below this (ids are printable ASCII, all below 0x7f).
pub const ID_UPPER_BOUND: &str = "\u{7f}";

/// The smallest string greater than every string starting with `prefix`
/// (`prefix` is a validated id prefix: ASCII below 0x7f). Tiers list a prefix
/// as the id range `[prefix, prefix_upper_bound(prefix))`.
pub fn prefix_upper_bound(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    match bytes.last_mut() {
        Some(last) => {
            *last += 1;
            String::from_utf8(bytes).expect("ASCII stays ASCII")
        }
        None => ID_UPPER_BOUND.to_owned(),
    }
}

#[cfg(test)]
mod prefix_tests {
    use super::*;

    #[test]
    fn prefix_bounds() {
        assert_eq!(prefix_upper_bound("user:"), "user;");
        assert_eq!(prefix_upper_bound("abz"), "ab{");
        assert_eq!(prefix_upper_bound(""), ID_UPPER_BOUND);
    }
}

#[cfg(test)]
mod storable_tests {
    use super::*;
    use serde_json::json;

    fn object(value: serde_json::Value) -> JsonObject {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_nul_anywhere_is_named_by_its_path() {
        assert_eq!(
            unstorable(&object(json!({"a": "fine", "b": [1, {"c": "é"}]}))),
            None
        );
        assert_eq!(
            unstorable(&object(json!({"a": {"b/c": ["x", "y\u{0}"]}}))).as_deref(),
            Some("the string at /a/b~1c/1 contains U+0000, which cannot be stored")
        );
        assert!(unstorable(&object(json!({"k\u{0}": 1}))).is_some());
    }
}
