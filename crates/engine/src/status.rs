//! What the admin API reports: health, status and metrics, read from the
//! engine's own state (breakers, control state, counters) at request time.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use hybridstore_api::{
    BreakerState, CollectionStatus, HealthReport, JournalBacklog, MetricsReport, OperationCounts,
    Overall, StatusReport, StrategyStatus, Switched, TierHealth, TierMetrics, UnreplayedKeys,
};

use crate::breaker::Breaker;
use crate::engine::Engine;

use crate::stats::{Operation, TierStats};
use crate::strategy::Plan;

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl Engine {
    fn tier_map(&self) -> BTreeMap<String, TierHealth> {
        self.health()
            .into_iter()
            .map(|tier| (tier.tier.clone(), tier))
            .collect()
    }

    fn overall(&self) -> Overall {
        let (up, all) = self.shared.breakers().fold((0, 0), |(up, all), breaker| {
            (up + usize::from(breaker.is_closed()), all + 1)
        });
        match up {
            0 => Overall::Down,
            up if up == all => Overall::Healthy,
            _ => Overall::Degraded,
        }
    }

    pub fn health_report(&self) -> HealthReport {
        HealthReport {
            status: self.overall(),
            tiers: self.tier_map(),
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
        let service = self
            .shared
            .settings
            .tiers
            .forced_strategy()
            .unwrap_or_else(|| self.shared.control.strategy());
        let applied = self.shared.control.applied();
        let collections = self
            .shared
            .catalog
            .iter()
            .map(|collection| {
                let switched = self.shared.control.switched(collection.spec.name.as_str());
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
                    own_strategy: collection.spec.strategy.is_some() || switched.is_some(),
                    effective: name,
                    plan: effective.map(Plan::view),
                    reason: self.degradation_reason(configured, effective),
                    note: match switched {
                        Some(to) => Some(format!("switched to {to} by an operator")),
                        None => collection.held_back(self.shared.control.strategy()),
                    },
                }
            })
            .collect();
        StatusReport {
            instance_id: self.shared.instance_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
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
            tiers: self.tier_map(),
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
                UnreplayedKeys { keys, unknown }
            },
            cache_generation: applied.map_or(0, |state| state.cache_generation),
        }
    }

    fn tier_metrics(breaker: &Breaker) -> TierMetrics {
        TierMetrics {
            calls: breaker.stats.calls.load(Ordering::Relaxed),
            failures: breaker.stats.failures.load(Ordering::Relaxed),
            background_calls: breaker.stats.background_calls.load(Ordering::Relaxed),
            degradations: breaker.health().degradations,
            latency: breaker.stats.latency.summary(),
        }
    }

    pub fn metrics_report(&self) -> MetricsReport {
        let operations: BTreeMap<String, OperationCounts> = Operation::ALL
            .iter()
            .map(|op| (op.as_str().to_owned(), self.shared.stats.counts(*op)))
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
        let tiers: BTreeMap<String, _> = self
            .shared
            .breakers()
            .map(|breaker| (breaker.health().tier, Self::tier_metrics(breaker)))
            .collect();
        MetricsReport {
            operations,
            requests,
            error_rate: ratio(failed, requests),
            cache_hits: hits,
            cache_misses: misses,
            cache_hit_rate: ratio(hits, hits + misses),
            degradations: tiers.values().map(|tier| tier.degradations).sum(),
            tiers,
            replay: self.journal.replay_stats(),
        }
    }

    /// The engine's counters, for exporters (Prometheus).
    pub fn stats(&self) -> &crate::stats::EngineStats {
        &self.shared.stats
    }

    /// Each tier's health and call statistics (durable, then cache).
    pub fn tier_stats(&self) -> Vec<(TierHealth, &TierStats)> {
        self.shared
            .breakers()
            .map(|breaker| (breaker.health(), &breaker.stats))
            .collect()
    }
}
