//! Writes through the cache's journal, and their replay into the durable tier.
//!
//! Two situations journal writes: a `cache_first` collection always does
//! (write-behind), and every collection that keeps cache copies does while the
//! durable tier is down (outage). Either way the cache tier checks the
//! precondition, assigns the version and appends the entry in one atomic step,
//! and the write is acknowledged only after that step.
//!
//! The replay loop reads entries through a consumer group (so several
//! instances share the work, and entries a crashed instance took are claimed
//! again), keeps the newest change per record, applies the batch to the durable
//! tier in one transaction guarded by version, and only then acknowledges the
//! entries. Applying an entry twice, or after a newer write, changes nothing.
//!
//! The component owns what this instance knows of the journals: whether
//! entries of each kind may wait ([`backlog`]), the keys it journaled and
//! has not seen replayed ([`unreplayed`]), and the replay's progress. Its
//! methods are split by what they do: journaled writes (`write`), replay
//! (`replay`), and settling keys a request would otherwise read from behind
//! the journal (`settle`).

pub(crate) mod backlog;
mod replay;
pub(crate) mod settle;
pub(crate) mod unreplayed;
mod write;

use hybridstore_api::ReplayStats;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use crate::shared::Shared;
use backlog::Backlog;
use unreplayed::Unreplayed;

/// The replay in progress: since when, and how much so far.
#[derive(Default)]
pub(crate) struct ReplayProgress {
    started: Option<std::time::Instant>,
    run: ReplayStats,
    total: ReplayStats,
}

/// The journals as this instance sees them (see the module docs).
pub(crate) struct Journal {
    shared: Arc<Shared>,
    /// Whether writes taken during a durable-tier outage may still wait in
    /// the journal (kept current by the replay loop).
    pub(crate) outage_backlog: Backlog,
    /// Whether write-behind (`cache_first`) writes may still wait.
    pub(crate) write_behind_backlog: Backlog,
    /// Keys whose journaled version this instance has not seen reach the
    /// durable tier (consulted while the cache is unreachable).
    pub(crate) unreplayed: Unreplayed,
    /// The collections that left `cache_first` (by a switch of the service
    /// or of themselves) since the write-behind journal was last seen
    /// empty: they may still have write-behind entries. A process starts
    /// with the strategies it loads, without history: a switch away from
    /// `cache_first` followed at once by a restart while the cache is
    /// unreachable is not covered.
    pub(crate) left_write_behind: Mutex<std::collections::HashSet<String>>,
    /// Whether `left_write_behind` holds any (read without the lock).
    pub(crate) wrote_behind: AtomicBool,
    replay: Mutex<ReplayProgress>,
    /// The publishing of held keys past an open durable breaker (see
    /// `write::hold_past_breaker`).
    direct_hold: tokio::sync::Mutex<DirectHold>,
}

/// When the last publishing past the breaker started, and when one last
/// failed.
#[derive(Default)]
pub(crate) struct DirectHold {
    started: Option<std::time::Instant>,
    failed: Option<std::time::Instant>,
}

impl Journal {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            outage_backlog: Backlog::default(),
            write_behind_backlog: Backlog::default(),
            unreplayed: Unreplayed::default(),
            left_write_behind: Mutex::default(),
            wrote_behind: AtomicBool::new(false),
            replay: Mutex::new(ReplayProgress::default()),
            direct_hold: tokio::sync::Mutex::new(DirectHold::default()),
        }
    }
}
