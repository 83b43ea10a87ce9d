//! Write-behind: writes the cache tier accepts ahead of the durable tier, and
//! the journal that carries them to the durable tier.
//!
//! A journaled write updates the cache copy and appends a journal entry in one
//! atomic step. Replay applies entries to the durable tier guarded by version,
//! so applying an entry twice, or an old entry after a newer write, changes
//! nothing: delivery at least once plus an idempotent apply is exactly once.

use time::OffsetDateTime;

use crate::{JsonObject, Precondition, Record, RecordKey, Version};

/// What a journaled write does to the record.
#[derive(Clone, Debug)]
pub enum WriteChange {
    Put {
        data: JsonObject,
        expires_at: Option<OffsetDateTime>,
    },
    Delete,
}

/// Why a write was journaled; each kind has its own journal, so that the
/// backlog of outage writes (which must drain before the configured strategy
/// resumes) is not mixed with the steady write-behind of `cache_first`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalKind {
    /// `cache_first`: the cache takes writes ahead of the durable tier.
    WriteBehind,
    /// The durable tier is down: the cache takes writes until it is back.
    Outage,
}

impl JournalKind {
    pub const ALL: [JournalKind; 2] = [JournalKind::WriteBehind, JournalKind::Outage];
}

/// A write for the cache tier to take itself: journaled (ahead of the
/// durable tier) or, with `journal: None`, as the only tier (`redis_only`).
#[derive(Clone, Debug)]
pub struct CacheWrite {
    pub journal: Option<JournalKind>,
    pub key: RecordKey,
    pub change: WriteChange,
    pub precondition: Precondition,
    pub now: OffsetDateTime,
    /// How long a cache-only deletion marker stays.
    pub deleted_marker_ttl: std::time::Duration,
    /// Whether the write may go ahead when the cache knows nothing of the
    /// record (no copy, no deletion marker). Only safe without a precondition,
    /// and only when the durable tier cannot be asked.
    pub unknown_state_ok: bool,
    /// The unique index values a put takes where the cache is the only
    /// tier of the deployment (cache-only), which then enforces them: a
    /// value another live record holds fails the write with
    /// `UniqueViolation`, changing nothing; values the record held and no
    /// longer does are freed, and a delete frees them all. Empty otherwise.
    pub claims: Vec<crate::IndexEntry>,
}

/// What the cache tier did with a journaled write.
#[derive(Clone, Debug, PartialEq)]
pub enum CacheWriteOutcome {
    Written {
        version: Version,
        /// True when the record was known not to exist before.
        created: bool,
        created_at: OffsetDateTime,
    },
    /// The cache holds nothing about the record: load it and try again.
    UnknownState,
    Conflict {
        current: Option<Version>,
    },
    NotFound,
}

/// A change to apply to the durable tier.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Put(Record),
    Delete {
        key: RecordKey,
        version: Version,
        at: OffsetDateTime,
    },
}

impl Change {
    pub fn key(&self) -> RecordKey {
        match self {
            Change::Put(record) => record.key(),
            Change::Delete { key, .. } => key.clone(),
        }
    }

    pub fn version(&self) -> Version {
        match self {
            Change::Put(record) => record.version,
            Change::Delete { version, .. } => *version,
        }
    }
}

/// One journal entry, as read for replay. `position` is opaque to everyone
/// but the cache tier that wrote it.
#[derive(Clone, Debug)]
pub struct JournalEntry {
    pub kind: JournalKind,
    pub position: JournalPosition,
    pub change: Change,
}

/// Where an entry sits, in the cache tier's own terms: the engine only
/// hands it back to acknowledge the entry, so what each part means stays
/// inside the tier (Redis: the stream, the entry id, the record key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalPosition {
    /// Which journal holds the entry.
    pub journal: String,
    /// The entry within that journal.
    pub entry: String,
    /// The copy the entry pinned (empty when it pins none).
    pub copy: String,
}

/// How many entries the durable tier refused a cache tier keeps for an
/// operator (per Redis shard); older ones go first.
pub const MAX_DEAD_LETTERS: u64 = 10_000;

/// The acknowledgement of a replayed entry.
#[derive(Clone, Debug)]
pub struct JournalAck {
    /// The record the entry changed.
    pub key: RecordKey,
    pub position: JournalPosition,
    pub version: Version,
    /// How long the copy may stay cached once unpinned.
    pub ttl: std::time::Duration,
    /// The durable tier already held a newer version: drop the copy.
    pub superseded: bool,
}

impl JournalAck {
    /// The acknowledgement of an entry set aside (the durable tier refused
    /// it): out of the journal, and its copy dropped like a superseded one.
    pub fn set_aside(entry: &JournalEntry) -> Self {
        Self {
            key: entry.change.key(),
            position: entry.position.clone(),
            version: entry.change.version(),
            ttl: std::time::Duration::from_secs(1),
            superseded: true,
        }
    }
}
