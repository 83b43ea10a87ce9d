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
//! `cache_first` and `redis_only` need the journal and the cache-authoritative
//! write path, which arrive with degradation; until then [`Plan::of`] refuses
//! them and configuration validation reports it.

use hybridstore_core::Strategy;

/// Where a write goes, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePath {
    /// Commit in the durable tier, then store the new version in the cache.
    DurableThenCache,
    /// Commit in the durable tier only.
    DurableOnly,
}

/// Where a read is served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPath {
    /// The cache; on a miss the durable tier, and the copy read there is filled
    /// into the cache (version-checked).
    CacheThenDurable,
    /// The durable tier only.
    DurableOnly,
    /// The cache only; a miss cannot be answered. Used while the durable tier
    /// is down, for collections whose cache copies are kept current.
    CacheOnly,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub write: WritePath,
    pub read: ReadPath,
}

impl Plan {
    pub fn of(strategy: Strategy) -> Option<Plan> {
        use ReadPath as R;
        use WritePath as W;
        let (write, read) = match strategy {
            Strategy::DualWrite => (W::DurableThenCache, R::CacheThenDurable),
            Strategy::DatabaseFirst => (W::DurableThenCache, R::DurableOnly),
            Strategy::PostgresOnly => (W::DurableOnly, R::DurableOnly),
            Strategy::CacheFirst | Strategy::RedisOnly => return None,
        };
        Some(Plan { write, read })
    }

    /// Whether this plan keeps copies in the cache at all.
    pub fn uses_cache(self) -> bool {
        self.write == WritePath::DurableThenCache || self.read != ReadPath::DurableOnly
    }

    /// The plan in force when only the durable tier is usable.
    pub const DURABLE_ONLY: Plan = Plan {
        write: WritePath::DurableOnly,
        read: ReadPath::DurableOnly,
    };

    /// The plan in force given which tiers are usable; `None` when nothing can
    /// serve. The configured plan applies while both tiers are up.
    pub fn degraded(self, durable_up: bool, cache_up: bool) -> Option<Plan> {
        match (durable_up, cache_up) {
            (true, true) => Some(self),
            (true, false) => Some(Plan::DURABLE_ONLY),
            // Only copies the cache has been kept current for may be served;
            // writes need the durable tier (the guard fails them fast).
            (false, true) if self.uses_cache() => Some(Plan {
                write: self.write,
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
        let plan = |s| Plan::of(s).map(|p| (p.write, p.read, p.uses_cache()));
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
        assert_eq!(plan(Strategy::CacheFirst), None);
        assert_eq!(plan(Strategy::RedisOnly), None);
    }

    #[test]
    fn health_narrows_the_plan() {
        let dual = Plan::of(Strategy::DualWrite).unwrap();
        let durable_only = Plan::of(Strategy::PostgresOnly).unwrap();
        assert_eq!(dual.degraded(true, true), Some(dual));
        assert_eq!(dual.degraded(true, false), Some(Plan::DURABLE_ONLY));
        assert_eq!(
            dual.degraded(false, true).map(|p| p.read),
            Some(ReadPath::CacheOnly)
        );
        assert_eq!(dual.degraded(false, false), None);
        assert_eq!(
            durable_only.degraded(false, true),
            None,
            "a collection without cache copies cannot be served from the cache"
        );
    }
}
