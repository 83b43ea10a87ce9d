//! The strategy table of SPEC section 4, as code.
//!
//! | strategy         | write acknowledged after               | read                         |
//! |------------------|----------------------------------------|------------------------------|
//! | `dual_write`     | durable commit, then cache updated     | cache, durable on miss (fill)|
//! | `database_first` | durable commit, cache kept warm        | durable                      |
//! | `postgres_only`  | durable commit                         | durable                      |
//! | `cache_first`    | cache + journal (write-behind)         | cache, durable on miss       |
//! | `redis_only`     | cache                                  | cache                        |
//!
//! `redis_only` keeps no durable copy at all: the cache is the truth, a miss is
//! a miss, and the collection is unavailable while the cache is.
//!
//! Health narrows the configured plan ([`Plan::degraded`]): while the durable
//! tier is down, collections that keep cache copies are written through the
//! cache and its outage journal and read from the cache only; while the cache is
//! down, everything goes to the durable tier. Nothing else narrows it: once a
//! tier is back, requests take their configured path at once, and journaled
//! versions the durable tier still lacks are settled key by key
//! (`journal/settle.rs`), never by holding a whole collection or service back.

use hybridstore_api::{PlanView, ReadPath, WritePath};
use hybridstore_core::Strategy;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub write: WritePath,
    pub read: ReadPath,
}

impl Plan {
    /// The plan as the admin API shows it.
    pub fn view(self) -> PlanView {
        PlanView {
            write: self.write,
            read: self.read,
        }
    }
}

/// What a read does about a key the cache does not hold (see
/// [`Plan::on_miss`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMiss {
    /// The cache is the truth: there is no such record.
    NotFound,
    /// The durable tier that would know is down: the answer is unknown.
    Unavailable,
    /// The durable tier answers; `fill`: what it finds is offered to the
    /// cache.
    Durable { fill: bool },
}

impl Plan {
    pub fn of(strategy: Strategy) -> Plan {
        use ReadPath as R;
        use WritePath as W;
        let (write, read) = match strategy {
            Strategy::DualWrite => (W::DurableThenCache, R::CacheThenDurable),
            Strategy::DatabaseFirst => (W::DurableThenCache, R::DurableOnly),
            Strategy::PostgresOnly => (W::DurableOnly, R::DurableOnly),
            Strategy::CacheFirst => (W::CacheJournaled, R::CacheThenDurable),
            Strategy::RedisOnly => (W::CacheOnly, R::CacheAuthoritative),
        };
        Plan { write, read }
    }

    /// Whether every write updates the cache copy, so copies stay current
    /// (everything but `postgres_only`).
    pub fn keeps_cache_current(self) -> bool {
        self.write != WritePath::DurableOnly
    }

    /// Whether reads may be answered from the cache.
    pub fn reads_cache(self) -> bool {
        self.read != ReadPath::DurableOnly
    }

    /// What a read does about a key the cache was asked for and did not
    /// hold (or did not answer for, when the durable tier can answer
    /// instead): the one rule every read path follows.
    pub fn on_miss(self) -> OnMiss {
        match self.read {
            ReadPath::CacheAuthoritative => OnMiss::NotFound,
            ReadPath::CacheOnly => OnMiss::Unavailable,
            ReadPath::CacheThenDurable => OnMiss::Durable { fill: true },
            ReadPath::DurableOnly => OnMiss::Durable { fill: false },
        }
    }

    /// Whether this plan keeps copies in the cache at all.
    pub fn uses_cache(self) -> bool {
        self.write != WritePath::DurableOnly || self.read != ReadPath::DurableOnly
    }

    /// The plan in force when only the durable tier is usable.
    pub const DURABLE_ONLY: Plan = Plan {
        write: WritePath::DurableOnly,
        read: ReadPath::DurableOnly,
    };

    /// The plan in force given which tiers are usable; `None` when nothing
    /// can serve correctly.
    pub fn degraded(self, durable_up: bool, cache_up: bool) -> Option<Plan> {
        if self.write == WritePath::CacheOnly {
            return cache_up.then_some(self);
        }
        match (durable_up, cache_up) {
            (true, true) => Some(self),
            (true, false) => Some(Plan::DURABLE_ONLY),
            // Only collections whose cache copies are kept current can be
            // served, and written, through the cache alone.
            (false, true) if self.uses_cache() => Some(Plan {
                write: WritePath::CacheJournaled,
                read: ReadPath::CacheOnly,
            }),
            (false, _) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table at the top of this file, row by row.
    #[test]
    fn plans_follow_the_strategy_table() {
        let plan = |s| {
            let p = Plan::of(s);
            Some((p.write, p.read, p.uses_cache()))
        };
        use ReadPath as R;
        use WritePath as W;
        assert_eq!(
            plan(Strategy::DualWrite),
            Some((W::DurableThenCache, R::CacheThenDurable, true))
        );
        assert_eq!(
            plan(Strategy::DatabaseFirst),
            Some((W::DurableThenCache, R::DurableOnly, true))
        );
        assert_eq!(
            plan(Strategy::PostgresOnly),
            Some((W::DurableOnly, R::DurableOnly, false))
        );
        assert_eq!(
            plan(Strategy::CacheFirst),
            Some((W::CacheJournaled, R::CacheThenDurable, true))
        );
        assert_eq!(
            plan(Strategy::RedisOnly),
            Some((W::CacheOnly, R::CacheAuthoritative, true))
        );
    }

    #[test]
    fn health_narrows_the_plan() {
        let dual = Plan::of(Strategy::DualWrite);
        let write_behind = Plan::of(Strategy::CacheFirst);
        let durable_only = Plan::of(Strategy::PostgresOnly);
        assert_eq!(dual.degraded(true, true), Some(dual));
        assert_eq!(dual.degraded(true, false), Some(Plan::DURABLE_ONLY));
        let outage = dual.degraded(false, true).unwrap();
        assert_eq!(
            (outage.write, outage.read),
            (WritePath::CacheJournaled, ReadPath::CacheOnly)
        );
        assert_eq!(dual.degraded(false, false), None);
        assert_eq!(write_behind.degraded(true, true), Some(write_behind));
        assert_eq!(durable_only.degraded(true, true), Some(durable_only));
        assert_eq!(
            write_behind.degraded(true, false),
            Some(Plan::DURABLE_ONLY),
            "keys whose newest version waits in the unreachable journal are refused key by key"
        );
        let cache_only = Plan::of(Strategy::RedisOnly);
        assert_eq!(cache_only.degraded(false, true), Some(cache_only));
        assert_eq!(
            cache_only.degraded(true, false),
            None,
            "no other copy exists"
        );
        assert_eq!(
            durable_only.degraded(false, true),
            None,
            "a collection without cache copies cannot be served from the cache"
        );
    }
}
