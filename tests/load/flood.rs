//! The flood: 1,000 concurrent PUTs of 1 MiB records, each with its own
//! Idempotency-Key, then large list calls, against the service's own
//! process, in both modes. What must hold (SPEC section 6a):
//!
//! - the process's peak resident memory stays under [`RSS_BOUND`]: request
//!   bodies, parsed records, stored idempotent responses and list answers
//!   are all bounded in bytes;
//! - no breaker opens: the tiers are healthy, only busy;
//! - load is shed with 503 + `Retry-After`, and a 503 is answered only for a
//!   write that is in neither tier, unless its code says the outcome is
//!   unknown (`outcome_unknown`);
//! - every write acknowledged is stored, and `/health` keeps answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hybridstore_testkit::{
    ADMIN_TOKEN, Postgres, Redis, RedisPersistence, ServiceProcess, blocking, create_database,
};
use reqwest::StatusCode;
use serde_json::Value;

use crate::ONE_AT_A_TIME;

/// The documented bound of the service's resident memory under the flood,
/// with default settings (README, "Resource bounds").
const RSS_BOUND: u64 = 256 * 1024 * 1024;
const WRITES: usize = 1000;
/// A record of about 1 MiB: the largest body the default limit takes.
const RECORD_BYTES: usize = 1024 * 1024 - 64;

struct Outcome {
    id: String,
    status: StatusCode,
    code: Option<String>,
    retry_after: bool,
}

async fn flood(embedded: bool) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let data = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("ADMIN_TOKEN".to_owned(), ADMIN_TOKEN.to_owned()),
        ("LOG_LEVEL".to_owned(), "warn".to_owned()),
    ];
    let mut servers = None;
    if embedded {
        env.push((
            "DATA_DIR".to_owned(),
            data.path().to_string_lossy().into_owned(),
        ));
    } else {
        let postgres = Arc::new(blocking(Postgres::start).await);
        let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::None)).await);
        let database = create_database(&postgres).await;
        env.push(("DATABASE_URL".to_owned(), postgres.url(&database)));
        env.push(("REDIS_URL".to_owned(), redis.url()));
        let db = sqlx::PgPool::connect(&postgres.url(&database))
            .await
            .unwrap();
        servers = Some((postgres, redis, db));
    }
    let bin = env!("CARGO_BIN_EXE_hybridstore");
    let service = Arc::new(blocking(move || ServiceProcess::start(bin, env)).await);
    let mode = if embedded { "embedded" } else { "production" };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(WRITES)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();

    // Resident memory, sampled while the flood runs.
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (service, running) = (service.clone(), running.clone());
        tokio::spawn(async move {
            let mut peak = 0;
            while running.load(Ordering::Relaxed) {
                if let Some((now, _)) = service.memory() {
                    peak = peak.max(now);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    // /health answers throughout (the runtime is never stalled).
    // /health answers throughout (the runtime is never stalled), asked from
    // an OS thread of its own: the test's runtime is busy sending the flood.
    let slowest_health = Arc::new(AtomicU64::new(0));
    let health = {
        let (url, running, slowest) = (
            service.url("/health"),
            running.clone(),
            slowest_health.clone(),
        );
        std::thread::spawn(move || {
            let address = url
                .trim_start_matches("http://")
                .trim_end_matches("/health")
                .to_owned();
            while running.load(Ordering::Relaxed) {
                let started = Instant::now();
                let mut stream = std::net::TcpStream::connect(&address).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                std::io::Write::write_all(
                    &mut stream,
                    b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n",
                )
                .unwrap();
                let mut answer = [0u8; 12];
                std::io::Read::read_exact(&mut stream, &mut answer).expect("/health answers");
                assert!(answer.ends_with(b"200"), "/health answers 200");
                slowest.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let started = Instant::now();
    let writes: Vec<_> = (0..WRITES)
        .map(|n| {
            let (client, service) = (client.clone(), service.clone());
            tokio::spawn(async move {
                let id = format!("f{n}");
                let fill = char::from(b'a' + (n % 26) as u8).to_string();
                let body = format!(r#"{{"n":{n},"blob":"{}"}}"#, fill.repeat(RECORD_BYTES - 32));
                let answer = client
                    .put(service.url(&format!("/v1/collections/accounts/records/{id}")))
                    .bearer_auth(ADMIN_TOKEN)
                    .header("content-type", "application/json")
                    .header("idempotency-key", format!("flood-{n}"))
                    .body(body)
                    .send()
                    .await
                    .expect("every request is answered");
                let status = answer.status();
                let retry_after = answer.headers().contains_key("retry-after");
                let code = if status.is_success() {
                    None
                } else {
                    let problem: Value = answer.json().await.unwrap_or_default();
                    problem["code"].as_str().map(str::to_owned)
                };
                Outcome {
                    id,
                    status,
                    code,
                    retry_after,
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for write in writes {
        outcomes.push(write.await.unwrap());
    }
    let flood_took = started.elapsed();
    let (_, peak_writes) = service.memory().expect("the service runs");
    // Large lists, at once.
    let lists: Vec<_> = (0..3)
        .map(|_| {
            let (client, service) = (client.clone(), service.clone());
            tokio::spawn(async move {
                let answer = client
                    .get(service.url("/v1/collections/accounts/records?limit=1000"))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .unwrap();
                let status = answer.status();
                let body = answer.bytes().await.unwrap();
                (status, body.len())
            })
        })
        .collect();
    let mut listed = Vec::new();
    for list in lists {
        listed.push(list.await.unwrap());
    }
    running.store(false, Ordering::Relaxed);
    let peak_sampled = sampler.await.unwrap();
    health.join().expect("/health answered throughout");
    let (_, peak) = service.memory().expect("the service runs");

    let mut by_status = std::collections::BTreeMap::new();
    for outcome in &outcomes {
        *by_status
            .entry((outcome.status.as_u16(), outcome.code.clone()))
            .or_insert(0) += 1;
    }
    let status: Value = client
        .get(service.url("/admin/database/status"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    println!(
        "flood ({mode}): {WRITES} writes in {flood_took:?}: {by_status:?}; lists {listed:?}; \
         peak RSS {} MiB (writes {} MiB, sampled {} MiB); slowest /health {} ms",
        peak / (1024 * 1024),
        peak_writes / (1024 * 1024),
        peak_sampled / (1024 * 1024),
        slowest_health.load(Ordering::Relaxed)
    );

    for (tier, health) in status["tiers"].as_object().unwrap() {
        let log = service.log();
        let degraded: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("degraded") || line.contains("suspended"))
            .take(5)
            .collect();
        assert_eq!(
            health["degradations"], 0,
            "{mode}: the {tier} breaker never opened under load alone: {health}\n{degraded:#?}"
        );
    }
    // What the durable tier holds, and what a read finds (the cache first).
    let stored: std::collections::HashSet<String> = match &servers {
        Some((_, _, db)) => {
            sqlx::query_scalar("SELECT id FROM records WHERE collection = 'accounts'")
                .fetch_all(db)
                .await
                .unwrap()
                .into_iter()
                .collect()
        }
        None => Default::default(),
    };
    for outcome in &outcomes {
        let found = client
            .get(service.url(&format!("/v1/collections/accounts/records/{}", outcome.id)))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .status();
        match outcome.status {
            StatusCode::CREATED => {
                assert_eq!(found, StatusCode::OK, "{mode}: {} acknowledged", outcome.id);
            }
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                assert!(
                    outcome.retry_after,
                    "{mode}: a shed request says when to retry"
                );
                if outcome.code.as_deref() != Some("outcome_unknown") {
                    assert_eq!(
                        found,
                        StatusCode::NOT_FOUND,
                        "{mode}: {} answered {} {:?} but was written",
                        outcome.id,
                        outcome.status,
                        outcome.code
                    );
                    assert!(
                        !stored.contains(&outcome.id),
                        "{mode}: {} answered 503 but PostgreSQL holds it",
                        outcome.id
                    );
                }
            }
            other => panic!("{mode}: {} answered {other} {:?}", outcome.id, outcome.code),
        }
    }
    for (status, _) in &listed {
        assert_eq!(*status, StatusCode::OK, "{mode}: lists answer");
    }
    assert!(
        peak < RSS_BOUND,
        "{mode}: peak RSS {} MiB is above the bound of {} MiB",
        peak / (1024 * 1024),
        RSS_BOUND / (1024 * 1024)
    );
    drop(servers);
}

#[tokio::test]
async fn a_flood_of_large_writes_stays_in_bounds_in_production() {
    flood(false).await;
}

#[tokio::test]
async fn a_flood_of_large_writes_stays_in_bounds_embedded() {
    flood(true).await;
}
