//! Counters and latency histograms kept by the engine itself.
//!
//! They live in the engine (not in a process-global metrics registry) so that
//! each engine reports its own numbers, however many run in one process (the
//! test suite runs dozens), and so the admin API and Prometheus read the same
//! figures. Everything is a relaxed atomic: recording costs a few nanoseconds
//! and never blocks a request.

use hybridstore_api::{LatencySummary, OperationCounts};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two: percentiles are exact to within ~19%.
const SUB_BUCKETS: usize = 4;
/// Powers of two of microseconds covered: up to 2^28 µs (~4.5 min).
const OCTAVES: usize = 29;
const BUCKETS: usize = OCTAVES * SUB_BUCKETS;

/// A latency histogram with logarithmic buckets (HDR-style, 2 bits of
/// mantissa), in microseconds.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

/// The bucket of a value in microseconds.
fn bucket_of(micros: u64) -> usize {
    if micros < SUB_BUCKETS as u64 {
        return micros as usize;
    }
    let octave = 63 - micros.leading_zeros() as usize; // >= 2
    let mantissa = ((micros >> (octave - 2)) & 0b11) as usize;
    ((octave - 1) * SUB_BUCKETS + mantissa).min(BUCKETS - 1)
}

/// The largest value (µs) that falls into `bucket`.
fn bucket_upper(bucket: usize) -> u64 {
    if bucket < SUB_BUCKETS {
        return bucket as u64;
    }
    let octave = bucket / SUB_BUCKETS + 1;
    let mantissa = (bucket % SUB_BUCKETS) as u64;
    ((SUB_BUCKETS as u64 + mantissa + 1) << (octave - 2)) - 1
}

impl Histogram {
    pub fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_micros.load(Ordering::Relaxed))
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1); zero when
    /// nothing was recorded.
    pub fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_micros(bucket_upper(bucket));
            }
        }
        Duration::from_micros(bucket_upper(BUCKETS - 1))
    }

    /// Cumulative counts at these upper bounds (seconds), for Prometheus.
    pub fn cumulative(&self, bounds_secs: &[f64]) -> Vec<u64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        bounds_secs
            .iter()
            .map(|bound| {
                let limit = (bound * 1e6) as u64;
                counts
                    .iter()
                    .enumerate()
                    .filter(|(bucket, _)| bucket_upper(*bucket) <= limit)
                    .map(|(_, count)| count)
                    .sum()
            })
            .collect()
    }

    pub fn summary(&self) -> LatencySummary {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        LatencySummary {
            count: self.count(),
            p50_ms: ms(self.quantile(0.50)),
            p95_ms: ms(self.quantile(0.95)),
            p99_ms: ms(self.quantile(0.99)),
        }
    }
}

/// The kinds of operation the engine serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Get,
    Put,
    Patch,
    Delete,
    List,
    BatchGet,
    Lookup,
    /// A counter increment.
    Increment,
    /// A read of counter buckets.
    CounterRead,
}

impl Operation {
    pub const ALL: [Operation; 9] = [
        Operation::Get,
        Operation::Put,
        Operation::Patch,
        Operation::Delete,
        Operation::List,
        Operation::BatchGet,
        Operation::Lookup,
        Operation::Increment,
        Operation::CounterRead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::Put => "put",
            Operation::Patch => "patch",
            Operation::Delete => "delete",
            Operation::List => "list",
            Operation::BatchGet => "batch_get",
            Operation::Lookup => "lookup",
            Operation::Increment => "increment",
            Operation::CounterRead => "counter_read",
        }
    }
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The request was refused (4xx): the service worked as it should.
    Rejected,
    /// The service could not serve it (no tier, internal error: 5xx).
    Failed,
}

#[derive(Default)]
pub(crate) struct OperationStats {
    ok: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    pub latency: Histogram,
}

/// What the engine counts.
#[derive(Default)]
pub struct EngineStats {
    operations: [OperationStats; Operation::ALL.len()],
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

impl EngineStats {
    fn of(&self, operation: Operation) -> &OperationStats {
        &self.operations[operation as usize]
    }

    pub(crate) fn record(&self, operation: Operation, outcome: Outcome, elapsed: Duration) {
        let stats = self.of(operation);
        let counter = match outcome {
            Outcome::Ok => &stats.ok,
            Outcome::Rejected => &stats.rejected,
            Outcome::Failed => &stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        stats.latency.record(elapsed);
    }

    /// A read was answered by the cache (`hit`) or had to go further.
    pub(crate) fn cache_lookup(&self, hit: bool, count: u64) {
        let counter = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        counter.fetch_add(count, Ordering::Relaxed);
    }

    pub fn counts(&self, operation: Operation) -> OperationCounts {
        let stats = self.of(operation);
        OperationCounts {
            ok: stats.ok.load(Ordering::Relaxed),
            rejected: stats.rejected.load(Ordering::Relaxed),
            failed: stats.failed.load(Ordering::Relaxed),
            latency: stats.latency.summary(),
        }
    }

    pub fn latency(&self, operation: Operation) -> &Histogram {
        &self.of(operation).latency
    }

    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }

    pub fn cache_misses(&self) -> u64 {
        self.cache_misses.load(Ordering::Relaxed)
    }
}

tokio::task_local! {
    /// Set on the service's own work (start-up checks, the probes' cache
    /// recovery, replay, control sync, held keys, jobs): its tier calls are counted apart from those made to
    /// serve requests, so an idle service shows no request traffic.
    static BACKGROUND: ();
}

/// Runs `work` as background work (see [`TierStats`]).
pub async fn in_background<F: Future>(work: F) -> F::Output {
    BACKGROUND.scope((), work).await
}

fn is_background() -> bool {
    BACKGROUND.try_with(|_| ()).is_ok()
}

/// Calls, failures and latency of one tier, kept by its breaker. Calls made
/// to serve requests and those of background work are counted apart; a
/// probe's ping is not a call (the breaker keeps its round trip).
#[derive(Default)]
pub struct TierStats {
    pub calls: AtomicU64,
    /// Calls that failed because the tier was unavailable (or timed out).
    pub failures: AtomicU64,
    pub background_calls: AtomicU64,
    pub background_failures: AtomicU64,
    /// Latency of calls made to serve requests.
    pub latency: Histogram,
}

impl TierStats {
    /// Counts one call (and whether it failed) under its origin.
    pub(crate) fn count(&self, failed: bool, elapsed: Option<std::time::Duration>) {
        let (calls, failures) = if is_background() {
            (&self.background_calls, &self.background_failures)
        } else {
            if let Some(elapsed) = elapsed {
                self.latency.record(elapsed);
            }
            (&self.calls, &self.failures)
        };
        calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_contain_their_values() {
        for micros in [
            0, 1, 3, 4, 5, 7, 8, 100, 1_000, 12_345, 1_000_000, 60_000_000,
        ] {
            let bucket = bucket_of(micros);
            assert!(bucket_upper(bucket) >= micros, "{micros} above its bucket");
            if bucket > 0 {
                assert!(
                    bucket_upper(bucket - 1) < micros,
                    "{micros} below its bucket"
                );
            }
        }
        for bucket in 1..BUCKETS {
            assert!(bucket_upper(bucket) > bucket_upper(bucket - 1));
        }
    }

    #[test]
    fn quantiles_land_within_a_bucket_of_the_truth() {
        let histogram = Histogram::default();
        for ms in 1..=100 {
            histogram.record(Duration::from_millis(ms));
        }
        let p50 = histogram.quantile(0.5).as_secs_f64() * 1e3;
        let p99 = histogram.quantile(0.99).as_secs_f64() * 1e3;
        assert!((50.0..=62.5).contains(&p50), "p50 {p50}");
        assert!((99.0..=124.0).contains(&p99), "p99 {p99}");
        assert_eq!(histogram.count(), 100);
        assert_eq!(histogram.cumulative(&[0.0005, 1.0]), vec![0, 100]);
        assert_eq!(Histogram::default().quantile(0.5), Duration::ZERO);
    }
}
