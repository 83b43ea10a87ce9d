//! Load and fault tests, in their own test binary: they keep a 2-core
//! machine busy, and tests beside them would see it as slowness. Cargo runs
//! test binaries one after the other; within this one, a lock runs them one
//! at a time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hybridstore_core::Amount;
use hybridstore_testkit::{TestApp, until};
use reqwest::StatusCode;
use serde_json::{Value, json};

mod campaign;
mod flood;
mod schemathesis;

/// One load test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What was acknowledged, summed exactly per field.
#[derive(Default)]
struct Acked(BTreeMap<String, Amount>);

impl Acked {
    fn add(&mut self, deltas: &Value) {
        for (field, delta) in deltas.as_object().unwrap() {
            let delta = Amount::parse_decimal(&delta.to_string()).unwrap();
            let sum = self.0.entry(field.clone()).or_default();
            *sum = sum.checked_add(delta).unwrap();
        }
    }

    fn texts(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .map(|(field, sum)| (field.clone(), sum.to_string()))
            .collect()
    }
}

/// The deltas of increment `n` of client `client`: integers, micro-dollars
/// and a negative adjustment now and then.
fn deltas(client: u64, n: u64) -> Value {
    let mut deltas = json!({
        "requests": 1,
        "input_tokens": (client * 7 + n) % 1000,
        "cost_usd": format!("0.{:06}", (n * 37 + client) % 1_000_000).parse::<f64>().unwrap(),
    });
    if n.is_multiple_of(10) {
        deltas["credit_usd"] = json!(-0.000001);
    }
    deltas
}

/// PostgreSQL's total bucket once the journal has drained.
async fn drained_postgres_totals(app: &TestApp, scope: &str) -> BTreeMap<String, String> {
    assert!(
        until(Duration::from_secs(30), || async {
            app.counter_backlog().await == 0
        })
        .await,
        "the counter journal drains"
    );
    app.postgres_counters(scope, "total").await
}

#[tokio::test]
async fn twenty_clients_ten_thousand_increments_sum_exactly_in_both_tiers() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // About sums under concurrency, not faults (the next tests): timeouts
    // generous enough that a test machine's busy moment trips no breaker.
    let app = Arc::new(
        TestApp::builder()
            .config("redis.call_timeout_ms", 3000)
            .config("postgres.call_timeout_ms", 5000)
            .config("postgres.acquire_timeout_ms", 5000)
            .spawn()
            .await,
    );
    let scope = "usage:key_1:model:sonnet";
    let acked = Arc::new(Mutex::new(Acked::default()));
    let clients: Vec<_> = (0..20u64)
        .map(|client| {
            let (app, acked) = (app.clone(), acked.clone());
            tokio::spawn(async move {
                for n in 0..500 {
                    let deltas = deltas(client, n);
                    let response = app.increment(scope, json!({ "deltas": deltas })).await;
                    let status = response.status();
                    assert_eq!(status, StatusCode::OK, "{}", response.text().await.unwrap());
                    acked.lock().unwrap().add(&deltas);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let expected = acked.lock().unwrap().texts();
    assert_eq!(expected["requests"], "10000");
    assert_eq!(
        drained_postgres_totals(&app, scope).await,
        expected,
        "PostgreSQL"
    );
    assert_eq!(app.redis_totals(scope).await, expected, "Redis");
    // Every granularity got the same sums (all increments are "now").
    let day = app.postgres_counters(scope, "day").await;
    assert_eq!(day["requests"], "10000");

    // The read API agrees, and so does the increment's answer.
    let read = app.read_counters(scope, "").await;
    assert_eq!(read["complete"], true);
    assert_eq!(read["buckets"][0]["values"]["requests"], 10000);
    let response: Value = app
        .increment(scope, json!({"deltas": {"requests": 1}}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(response["totals"]["requests"], 10001);
    assert_eq!(response["complete"], true);
}

#[tokio::test]
async fn killing_postgres_then_redis_under_load_loses_and_doubles_nothing() {
    let _alone = ONE_AT_A_TIME.lock().await;
    use hybridstore_testkit::{Postgres, Redis, RedisPersistence, blocking};
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::AppendOnly)).await);
    let app = Arc::new(
        TestApp::builder()
            .servers(postgres.clone(), redis.clone())
            .spawn()
            .await,
    );
    let scope = "usage:faults";
    let acked = Arc::new(Mutex::new(Acked::default()));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let clients: Vec<_> = (0..20u64)
        .map(|client| {
            let (app, acked, refused, running) =
                (app.clone(), acked.clone(), refused.clone(), running.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    let deltas = deltas(client, n);
                    n += 1;
                    // As a relay does: a failed call (its effect unknown) is
                    // retried with the same Idempotency-Key until answered.
                    let key = format!("c{client}-{n}");
                    loop {
                        let response = app
                            .admin(
                                reqwest::Method::POST,
                                &format!("/v1/counters/{scope}/increment"),
                            )
                            .header("idempotency-key", &key)
                            .json(&json!({ "deltas": deltas }))
                            .send()
                            .await;
                        if response.is_ok_and(|r| r.status() == StatusCode::OK) {
                            acked.lock().unwrap().add(&deltas);
                            break;
                        }
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));

    pause(700).await;
    let pg = postgres.clone();
    blocking(move || pg.kill()).await;
    assert!(app.wait_for_tier("durable", "open").await);
    let before_outage = acked.lock().unwrap().0.get("requests").copied();
    pause(1000).await;
    assert!(
        acked.lock().unwrap().0.get("requests").copied() > before_outage,
        "increments are accepted while PostgreSQL is down"
    );
    let pg = postgres.clone();
    blocking(move || pg.restart()).await;
    assert!(app.wait_for_tier("durable", "closed").await);
    pause(700).await;

    let server = redis.clone();
    blocking(move || server.kill()).await;
    assert!(app.wait_for_tier("cache", "open").await);
    let before_outage = acked.lock().unwrap().0.get("requests").copied();
    pause(1000).await;
    assert!(
        acked.lock().unwrap().0.get("requests").copied() > before_outage,
        "increments go to PostgreSQL while Redis is down"
    );
    let server = redis.clone();
    blocking(move || server.restart()).await;
    assert!(app.wait_for_tier("cache", "closed").await);
    pause(700).await;

    running.store(false, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let expected = acked.lock().unwrap().texts();
    let stored = drained_postgres_totals(&app, scope).await;
    assert_eq!(
        stored,
        expected,
        "PostgreSQL holds exactly the acknowledged increments ({} attempts retried during the faults)",
        refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    // A fresh read (Redis reseeds from PostgreSQL) agrees too.
    let read = app.read_counters(scope, "granularity=total").await;
    let requests = &expected["requests"];
    assert_eq!(
        read["buckets"][0]["values"]["requests"].to_string(),
        *requests
    );
}
