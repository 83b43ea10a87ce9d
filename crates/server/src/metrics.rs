//! `GET /metrics`: Prometheus text format, written by this module alone.
//!
//! One pipeline: HTTP request counts and latencies are kept here in the
//! engine's own [`Histogram`] (fixed memory, lock-free recording), and
//! everything the engine already counts (operations, cache hits, tier calls
//! and latency, breakers, strategy, journal, jobs) is read from it at scrape
//! time. The whole exposition is written by the same few functions below,
//! so the admin API and Prometheus never disagree, and each server (several
//! run in one test process) keeps its own numbers.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hybridstore_engine::{BreakerState, Engine, Histogram, JobState, Operation};

/// Histogram buckets (seconds) for every latency metric.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A route as the router names it (`/v1/collections/{collection}/...`):
/// a bounded set, so these maps stay small.
type Route = (&'static str, String);

/// What the server itself counts: HTTP requests (counts by method, route
/// and status; latency by method and route), requests shed by admission,
/// and the scheduled backups.
#[derive(Default)]
pub struct ServerMetrics {
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    latency: Mutex<BTreeMap<Route, Arc<Histogram>>>,
    shed: AtomicU64,
    pub backups: BackupMetrics,
}

/// Scheduled backups: how many were made and failed, and when the last one
/// was made, so that a backup that stops happening alerts.
#[derive(Default)]
pub struct BackupMetrics {
    /// The schedule (0: no scheduled backups).
    interval_secs: AtomicU64,
    made: AtomicU64,
    failed: AtomicU64,
    /// Unix seconds of the last backup made (0: none yet).
    last_made: AtomicU64,
}

impl BackupMetrics {
    pub fn scheduled(&self, every: Duration) {
        self.interval_secs.store(every.as_secs(), Ordering::Relaxed);
    }

    pub fn made(&self) {
        self.made.fetch_add(1, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.last_made.store(now, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        family(
            out,
            "hybridstore_backup_interval_seconds",
            "gauge",
            "How often this instance makes a scheduled backup (0: it makes none)",
        );
        let interval = self.interval_secs.load(Ordering::Relaxed);
        sample(out, "hybridstore_backup_interval_seconds", &[], interval);
        family(
            out,
            "hybridstore_backups_total",
            "counter",
            "Scheduled backups by outcome",
        );
        for (outcome, count) in [("made", &self.made), ("failed", &self.failed)] {
            sample(
                out,
                "hybridstore_backups_total",
                &[("outcome", outcome)],
                count.load(Ordering::Relaxed),
            );
        }
        family(
            out,
            "hybridstore_backup_last_made_timestamp_seconds",
            "gauge",
            "When the last scheduled backup was made (Unix seconds; 0: none since start)",
        );
        let last = self.last_made.load(Ordering::Relaxed);
        sample(
            out,
            "hybridstore_backup_last_made_timestamp_seconds",
            &[],
            last,
        );
    }
}

/// The resident memory of this process, in bytes (Linux; `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The method's name as a static string (the few the API has; anything
/// else is `OTHER`).
fn method_name(method: &str) -> &'static str {
    ["GET", "PUT", "POST", "PATCH", "DELETE", "HEAD", "OPTIONS"]
        .into_iter()
        .find(|known| *known == method)
        .unwrap_or("OTHER")
}

impl ServerMetrics {
    /// Counts one finished request.
    pub fn record(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let method = method_name(method);
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((method, route.to_owned(), status))
            .or_default() += 1;
        let histogram = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((method, route.to_owned()))
            .or_default()
            .clone();
        histogram.record(elapsed);
    }

    /// A request shed by admission (`503 overloaded`).
    pub fn shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    /// The whole exposition: HTTP metrics, then the engine's.
    pub async fn render(&self, engine: &Engine) -> String {
        let mut out = String::new();
        self.render_http(&mut out);
        self.backups.render(&mut out);
        if let Some(bytes) = resident_bytes() {
            family(
                &mut out,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of this process in bytes",
            );
            sample(&mut out, "process_resident_memory_bytes", &[], bytes);
        }
        render_engine(&mut out, engine).await;
        out
    }

    fn render_http(&self, out: &mut String) {
        family(
            out,
            "http_requests_total",
            "counter",
            "HTTP requests by method, route template and status",
        );
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for ((method, route, status), count) in requests {
            let status = status.to_string();
            let labels = [("method", method), ("route", &route), ("status", &status)];
            sample(out, "http_requests_total", &labels, count);
        }
        family(
            out,
            "http_request_duration_seconds",
            "histogram",
            "HTTP request latency by method and route template",
        );
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for ((method, route), recorded) in latency {
            let labels = [("method", method), ("route", &route)];
            histogram(out, "http_request_duration_seconds", &labels, &recorded);
        }
        family(
            out,
            "hybridstore_requests_shed_total",
            "counter",
            "Requests shed by admission (503 overloaded) before any work",
        );
        sample(
            out,
            "hybridstore_requests_shed_total",
            &[],
            self.shed.load(Ordering::Relaxed),
        );
    }
}

/// Writes one metric family's header.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// A latency histogram of the engine as Prometheus buckets.
fn histogram(out: &mut String, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
    let cumulative = histogram.cumulative(&LATENCY_BUCKETS);
    for (bound, count) in LATENCY_BUCKETS.iter().zip(cumulative) {
        let le = bound.to_string();
        let mut with_le = labels.to_vec();
        with_le.push(("le", &le));
        sample(out, &format!("{name}_bucket"), &with_le, count);
    }
    let mut with_le = labels.to_vec();
    with_le.push(("le", "+Inf"));
    sample(out, &format!("{name}_bucket"), &with_le, histogram.count());
    sample(
        out,
        &format!("{name}_sum"),
        labels,
        histogram.sum().as_secs_f64(),
    );
    sample(out, &format!("{name}_count"), labels, histogram.count());
}

async fn render_engine(out: &mut String, engine: &Engine) {
    let stats = engine.stats();
    family(
        out,
        "hybridstore_operations_total",
        "counter",
        "Engine operations by kind and outcome (ok, rejected: 4xx, failed: 5xx)",
    );
    for op in Operation::ALL {
        let counts = stats.counts(op);
        for (outcome, value) in [
            ("ok", counts.ok),
            ("rejected", counts.rejected),
            ("failed", counts.failed),
        ] {
            sample(
                out,
                "hybridstore_operations_total",
                &[("operation", op.as_str()), ("outcome", outcome)],
                value,
            );
        }
    }
    family(
        out,
        "hybridstore_operation_duration_seconds",
        "histogram",
        "Engine operation latency by kind",
    );
    for op in Operation::ALL {
        histogram(
            out,
            "hybridstore_operation_duration_seconds",
            &[("operation", op.as_str())],
            stats.latency(op),
        );
    }
    family(
        out,
        "hybridstore_cache_hits_total",
        "counter",
        "Reads the cache answered",
    );
    sample(out, "hybridstore_cache_hits_total", &[], stats.cache_hits());
    family(
        out,
        "hybridstore_cache_misses_total",
        "counter",
        "Reads the cache could not answer",
    );
    sample(
        out,
        "hybridstore_cache_misses_total",
        &[],
        stats.cache_misses(),
    );

    let tiers = engine.tier_stats();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    family(
        out,
        "hybridstore_tier_up",
        "gauge",
        "1 while the tier's breaker is closed",
    );
    for (health, _) in &tiers {
        let up = u8::from(health.state == BreakerState::Closed);
        sample(
            out,
            "hybridstore_tier_up",
            &[("tier", &health.tier), ("backend", &health.backend)],
            up,
        );
    }
    family(
        out,
        "hybridstore_breaker_state",
        "gauge",
        "1 for the state each tier's breaker is in",
    );
    for (health, _) in &tiers {
        for state in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            sample(
                out,
                "hybridstore_breaker_state",
                &[("tier", &health.tier), ("state", state.as_str())],
                u8::from(health.state == state),
            );
        }
    }
    family(
        out,
        "hybridstore_tier_degradations_total",
        "counter",
        "Times a tier went from healthy to unavailable",
    );
    for (health, _) in &tiers {
        sample(
            out,
            "hybridstore_tier_degradations_total",
            &[("tier", &health.tier)],
            health.degradations,
        );
    }
    family(
        out,
        "hybridstore_tier_calls_total",
        "counter",
        "Calls to each tier, by origin: serving requests, or the service's own background work (the probes' checks, replay, control sync, jobs); a probe's ping is not a call",
    );
    for (health, tier) in &tiers {
        for (origin, calls) in [
            ("request", &tier.calls),
            ("background", &tier.background_calls),
        ] {
            sample(
                out,
                "hybridstore_tier_calls_total",
                &[("tier", &health.tier), ("origin", origin)],
                calls.load(relaxed),
            );
        }
    }
    family(
        out,
        "hybridstore_tier_errors_total",
        "counter",
        "Tier calls that failed because the tier was unavailable or timed out, by origin",
    );
    for (health, tier) in &tiers {
        for (origin, failures) in [
            ("request", &tier.failures),
            ("background", &tier.background_failures),
        ] {
            sample(
                out,
                "hybridstore_tier_errors_total",
                &[("tier", &health.tier), ("origin", origin)],
                failures.load(relaxed),
            );
        }
    }
    family(
        out,
        "hybridstore_tier_call_duration_seconds",
        "histogram",
        "Latency of tier calls made to serve requests",
    );
    for (health, tier) in &tiers {
        histogram(
            out,
            "hybridstore_tier_call_duration_seconds",
            &[("tier", &health.tier)],
            &tier.latency,
        );
    }

    let status = engine.status_report().await;
    family(
        out,
        "hybridstore_strategy",
        "gauge",
        "1 for the service-wide strategy in force",
    );
    sample(
        out,
        "hybridstore_strategy",
        &[
            ("strategy", status.strategy.service.as_str()),
            ("configured", status.strategy.configured.as_str()),
        ],
        1,
    );
    family(
        out,
        "hybridstore_collection_degraded",
        "gauge",
        "1 while health narrows a collection's strategy (or nothing can serve it)",
    );
    for collection in &status.collections {
        sample(
            out,
            "hybridstore_collection_degraded",
            &[
                ("collection", &collection.name),
                ("strategy", collection.strategy.as_str()),
            ],
            u8::from(collection.reason.is_some()),
        );
    }
    if let Some(backlog) = &status.journal_backlog {
        family(
            out,
            "hybridstore_journal_backlog",
            "gauge",
            "Journaled writes and counter increments waiting to be replayed into the durable tier",
        );
        for (journal, value) in [
            ("write_behind", backlog.write_behind),
            ("outage", backlog.outage),
            ("counters", backlog.counters),
        ] {
            sample(
                out,
                "hybridstore_journal_backlog",
                &[("journal", journal)],
                value,
            );
        }
        family(
            out,
            "hybridstore_journal_dead_letters",
            "gauge",
            "Journaled writes the durable tier refused, set aside for an operator",
        );
        sample(
            out,
            "hybridstore_journal_dead_letters",
            &[],
            backlog.dead_letters,
        );
    }
    family(
        out,
        "hybridstore_replay_entries_total",
        "counter",
        "Journal entries replayed and acknowledged",
    );
    sample(
        out,
        "hybridstore_replay_entries_total",
        &[],
        status.replay.entries,
    );
    family(
        out,
        "hybridstore_replay_applied_total",
        "counter",
        "Replayed changes the durable tier took (the others were superseded)",
    );
    sample(
        out,
        "hybridstore_replay_applied_total",
        &[],
        status.replay.applied,
    );
    family(
        out,
        "hybridstore_cache_generation",
        "gauge",
        "Times every cache copy was dropped by a strategy switch",
    );
    sample(
        out,
        "hybridstore_cache_generation",
        &[],
        status.cache_generation,
    );

    let jobs = engine.jobs();
    family(
        out,
        "hybridstore_jobs_running",
        "gauge",
        "Admin jobs (sync, consistency checks) running on this instance",
    );
    family(
        out,
        "hybridstore_job_records",
        "gauge",
        "Progress of running admin jobs, in records",
    );
    let running: Vec<_> = jobs
        .iter()
        .filter(|job| job.state == JobState::Running)
        .collect();
    for kind in [
        "sync_redis_to_postgres",
        "sync_postgres_to_redis",
        "consistency_check",
    ] {
        let of_kind: Vec<_> = running.iter().filter(|job| job.kind == kind).collect();
        sample(
            out,
            "hybridstore_jobs_running",
            &[("kind", kind)],
            of_kind.len(),
        );
        for (counter, value) in [
            (
                "total",
                of_kind.iter().map(|j| j.progress.total).sum::<u64>(),
            ),
            (
                "scanned",
                of_kind.iter().map(|j| j.progress.scanned).sum::<u64>(),
            ),
            (
                "written",
                of_kind.iter().map(|j| j.progress.written).sum::<u64>(),
            ),
        ] {
            sample(
                out,
                "hybridstore_job_records",
                &[("kind", kind), ("counter", counter)],
                value,
            );
        }
    }
    family(
        out,
        "hybridstore_uptime_seconds",
        "gauge",
        "Seconds since this instance started",
    );
    sample(out, "hybridstore_uptime_seconds", &[], status.uptime_secs);
}
