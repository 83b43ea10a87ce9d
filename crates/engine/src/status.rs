//! What the admin API reports: health, status and metrics, read from the
//! engine's own state (breakers, control state, counters) at request time.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use hybridstore_core::Strategy;
use serde::Serialize;
use time::OffsetDateTime;

use crate::breaker::{Breaker, BreakerState, TierHealth};
use crate::engine::Engine;
use crate::journal::ReplayStats;
use crate::stats::{LatencySummary, Operation, OperationCounts, TierStats};
use crate::strategy::Plan;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overall {
    /// Both tiers serve.
    Healthy,
    /// One tier is out; the other serves what it can.
    Degraded,
    /// Neither tier serves.
    Down,
}

#[derive(Clone, Debug, Serialize)]
pub struct HealthReport {
    pub status: Overall,
    pub tiers: BTreeMap<&'static str, TierHealth>,
}

#[derive(Clone, Debug, Serialize)]
pub struct JournalBacklog {
    pub write_behind: u64,
    pub outage: u64,
    /// Counter increments not yet in the durable tier.
    pub counters: u64,
    /// Journaled writes the durable tier refused, set aside for an operator.
    pub dead_letters: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StrategyStatus {
    /// From the configuration file / environment.
    pub configured: Strategy,
    /// In force for collections without a strategy of their own.
    pub service: Strategy,
    /// Set when an operator switched it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switched: Option<Switched>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Switched {
    pub revision: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub by: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct CollectionStatus {
    pub name: String,
    /// The strategy it follows (its own, or the service's).
    pub strategy: Strategy,
    /// Whether it declares its own strategy (the service's switch skips it).
    pub own_strategy: bool,
    /// What serves it now: the strategy's name when its plan is in force,
    /// `degraded` when health narrowed it, `unavailable` when nothing can.
    pub effective: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// Why `effective` differs from `strategy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    pub instance_id: String,
    pub uptime_secs: u64,
    pub status: Overall,
    pub strategy: StrategyStatus,
    pub collections: Vec<CollectionStatus>,
    pub tiers: BTreeMap<&'static str, TierHealth>,
    /// `None` when the cache cannot be asked.
    pub journal_backlog: Option<JournalBacklog>,
    pub replay: ReplayStats,
    /// What this instance would refuse to read from the durable tier while
    /// the cache is unreachable.
    pub unreplayed: Unreplayed,
    pub cache_generation: u64,
}

/// Keys this instance journaled (or took to replay) whose version it has not
/// seen reach the durable tier.
#[derive(Clone, Debug, Serialize)]
pub struct Unreplayed {
    pub keys: usize,
    /// Any key may be held: the process started, or remembered too many
    /// keys, since the journals were last seen empty.
    pub unknown: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct TierMetrics {
    pub calls: u64,
    pub failures: u64,
    pub degradations: u64,
    pub latency: LatencySummary,
}

#[derive(Clone, Debug, Serialize)]
pub struct MetricsReport {
    pub operations: BTreeMap<&'static str, OperationCounts>,
    pub requests: u64,
    /// Share of operations that failed inside (no tier, internal error).
    pub error_rate: f64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Share of cache-reading lookups the cache answered.
    pub cache_hit_rate: f64,
    pub tiers: BTreeMap<&'static str, TierMetrics>,
    /// Times a tier went from healthy to unavailable.
    pub degradations: u64,
    pub replay: ReplayStats,
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl Engine {
    fn tiers(&self) -> BTreeMap<&'static str, TierHealth> {
        let [durable, cache] = self.health();
        BTreeMap::from([("durable", durable), ("cache", cache)])
    }

    fn overall(&self) -> Overall {
        let durable = self.shared.durable.breaker.is_closed();
        let cache = self.shared.cache.breaker.is_closed();
        match (durable, cache) {
            (true, true) => Overall::Healthy,
            (false, false) => Overall::Down,
            _ => Overall::Degraded,
        }
    }

    pub fn health_report(&self) -> HealthReport {
        HealthReport {
            status: self.overall(),
            tiers: self.tiers(),
        }
    }

    /// Why health narrowed a collection's plan.
    fn degradation_reason(&self, configured: Plan, effective: Option<Plan>) -> Option<String> {
        let durable = self.shared.durable.breaker.state() == BreakerState::Closed;
        let cache = self.shared.cache.breaker.state() == BreakerState::Closed;
        if effective == Some(configured) {
            return None;
        }
        // Each tier names itself: `postgres` or `sqlite`, `redis` or `memory`.
        let (d, c) = (self.shared.durable.backend(), self.shared.cache.backend());
        Some(match (durable, cache) {
            (false, false) => format!("both tiers ({d}, {c}) are unavailable"),
            (false, true) if effective.is_some() => format!(
                "the durable tier ({d}) is unavailable: writes go to the outage journal in the cache ({c}), reads to the cache"
            ),
            (false, true) => format!(
                "the durable tier ({d}) is unavailable and this strategy keeps no copies in the cache ({c})"
            ),
            (true, false) if effective.is_some() => {
                format!("the cache ({c}) is unavailable: the durable tier ({d}) only")
            }
            (true, false) => {
                format!("the cache ({c}) is unavailable and is the only tier of this collection")
            }
            (true, true) => "the configured plan is in force".to_owned(),
        })
    }

    pub async fn status_report(&self) -> StatusReport {
        let service = self.shared.control.strategy();
        let applied = self.shared.control.applied();
        let collections = self
            .shared
            .catalog
            .iter()
            .map(|collection| {
                let strategy = self.shared.strategy_of(collection);
                let configured = Plan::of(strategy);
                let effective = self.shared.plan_for(collection).ok();
                let name = match effective {
                    None => "unavailable".to_owned(),
                    Some(plan) if plan == configured => strategy.to_string(),
                    Some(_) => "degraded".to_owned(),
                };
                CollectionStatus {
                    name: collection.spec.name.to_string(),
                    strategy,
                    own_strategy: collection.spec.strategy.is_some(),
                    effective: name,
                    plan: effective,
                    reason: self.degradation_reason(configured, effective),
                }
            })
            .collect();
        StatusReport {
            instance_id: self.shared.instance_id.clone(),
            uptime_secs: self.shared.started.elapsed().as_secs(),
            status: self.overall(),
            strategy: StrategyStatus {
                configured: self.shared.control.configured(),
                service,
                switched: applied
                    .as_ref()
                    .filter(|state| state.strategy.is_some())
                    .map(|state| Switched {
                        revision: state.revision,
                        at: state.changed_at,
                        by: state.changed_by.clone(),
                    }),
            },
            collections,
            tiers: self.tiers(),
            journal_backlog: match (
                self.journal.journal_backlog().await,
                self.counters.counter_backlog().await,
                self.shared.cache.call(|t| t.dead_letters()).await,
            ) {
                (Ok((write_behind, outage)), Ok(counters), Ok(dead_letters)) => {
                    Some(JournalBacklog {
                        write_behind,
                        outage,
                        counters,
                        dead_letters,
                    })
                }
                _ => None,
            },
            replay: self.journal.replay_stats(),
            unreplayed: {
                let (keys, unknown) = self.journal.unreplayed.summary();
                Unreplayed { keys, unknown }
            },
            cache_generation: applied.map_or(0, |state| state.cache_generation),
        }
    }

    fn tier_metrics(breaker: &Breaker) -> TierMetrics {
        TierMetrics {
            calls: breaker.stats.calls.load(Ordering::Relaxed),
            failures: breaker.stats.failures.load(Ordering::Relaxed),
            degradations: breaker.health().degradations,
            latency: breaker.stats.latency.summary(),
        }
    }

    pub fn metrics_report(&self) -> MetricsReport {
        let operations: BTreeMap<&'static str, OperationCounts> = Operation::ALL
            .iter()
            .map(|op| (op.as_str(), self.shared.stats.counts(*op)))
            .collect();
        let requests: u64 = operations
            .values()
            .map(|c| c.ok + c.rejected + c.failed)
            .sum();
        let failed: u64 = operations.values().map(|c| c.failed).sum();
        let (hits, misses) = (
            self.shared.stats.cache_hits(),
            self.shared.stats.cache_misses(),
        );
        let durable = Self::tier_metrics(&self.shared.durable.breaker);
        let cache = Self::tier_metrics(&self.shared.cache.breaker);
        MetricsReport {
            operations,
            requests,
            error_rate: ratio(failed, requests),
            cache_hits: hits,
            cache_misses: misses,
            cache_hit_rate: ratio(hits, hits + misses),
            degradations: durable.degradations + cache.degradations,
            tiers: BTreeMap::from([("durable", durable), ("cache", cache)]),
            replay: self.journal.replay_stats(),
        }
    }

    /// The engine's counters, for exporters (Prometheus).
    pub fn stats(&self) -> &crate::stats::EngineStats {
        &self.shared.stats
    }

    /// Each tier's health and call statistics (durable, then cache).
    pub fn tier_stats(&self) -> [(TierHealth, &TierStats); 2] {
        [
            (
                self.shared.durable.breaker.health(),
                &self.shared.durable.breaker.stats,
            ),
            (
                self.shared.cache.breaker.health(),
                &self.shared.cache.breaker.stats,
            ),
        ]
    }
}
