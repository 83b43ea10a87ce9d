//! Single-tier outages with the foundation's behaviour (automatic degradation
//! with breakers and journal comes later): the testkit's kill -9 and restart
//! are real, and what was acknowledged stays readable.

use std::sync::Arc;
use std::time::Duration;

use hybridstore_testkit::{
    Postgres, Redis, RedisPersistence, TestApp, blocking, etag_version, shared, until,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn postgres_killed_answers_503_serves_cached_reads_and_recovers_after_restart() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = blocking(|| shared().redis.clone()).await;
    let app = TestApp::builder()
        .servers(postgres.clone(), redis)
        .config("postgres.acquire_timeout_ms", 500)
        .spawn()
        .await;
    let v1 = etag_version(&app.put("accounts", "cached", json!({"n": 1})).await);

    let pg = postgres.clone();
    blocking(move || pg.kill()).await;

    // A create-only write of a record Redis knows nothing about cannot be
    // checked by anyone now: 503, whether the breaker has opened yet or not.
    // (A plain write would be taken into the outage journal once it has.)
    let refused = app
        .admin(
            reqwest::Method::PUT,
            "/v1/collections/accounts/records/late",
        )
        .header("if-none-match", "*")
        .json(&json!({"n": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    let problem: Value = refused.json().await.unwrap();
    // Refused at once once the breaker is open; a write already waiting on
    // the tier when it was found dead is released with its outcome unknown
    // (it may have been sent before the kill).
    assert!(
        problem["code"] == "backends_unavailable" || problem["code"] == "outcome_unknown",
        "{problem}"
    );
    assert!(
        !problem.to_string().contains("127.0.0.1"),
        "no internals in the body"
    );

    let cached = app.get("accounts", "cached").await;
    assert_eq!(
        cached.status(),
        StatusCode::OK,
        "a cached record is still served"
    );
    assert_eq!(etag_version(&cached), v1);
    assert_eq!(
        app.get("accounts", "uncached").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    let pg = postgres.clone();
    blocking(move || pg.restart()).await;
    // The breaker closes on the next successful probe; writes then succeed.
    let recovered = until(Duration::from_secs(5), || async {
        app.put("accounts", "late", json!({"n": 2}))
            .await
            .status()
            .is_success()
    })
    .await;
    assert!(recovered, "writes succeed again once PostgreSQL is back");
    assert_eq!(
        app.postgres_copy("accounts", "cached")
            .await
            .map(|c| c.version),
        Some(v1),
        "kill -9 lost no commit"
    );
}

#[tokio::test]
async fn redis_killed_keeps_reads_and_writes_on_postgres_without_stale_reads() {
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::None)).await);
    let postgres = blocking(|| shared().postgres.clone()).await;
    let app = TestApp::builder()
        .servers(postgres, redis.clone())
        .spawn()
        .await;
    let v1 = etag_version(&app.put("accounts", "a", json!({"n": 1})).await);
    assert_eq!(etag_version(&app.get("accounts", "a").await), v1);

    let server = redis.clone();
    blocking(move || server.kill()).await;

    let written = app.put("accounts", "a", json!({"n": 2})).await;
    assert_eq!(
        written.status(),
        StatusCode::OK,
        "writes commit in PostgreSQL"
    );
    let v2 = etag_version(&written);
    let read = app.get("accounts", "a").await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(
        etag_version(&read),
        v2,
        "the acknowledged write is what reads see"
    );

    let server = redis.clone();
    blocking(move || server.restart()).await;
    // The first calls after the restart may find the service's connection
    // dead (and reconnect); every read still answers v2, and one refills.
    let mut refilled = false;
    for _ in 0..20 {
        let read = app.get("accounts", "a").await;
        assert_eq!(etag_version(&read), v2);
        if app.redis_copy("accounts", "a").await.map(|c| c.version) == Some(v2) {
            refilled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refilled, "the cache was refilled with v{v2}");
}
