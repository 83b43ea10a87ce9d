//! Tier health: breakers route around a dead tier, both tiers down answers a
//! fast 503, and the service starts and recovers with a tier missing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridstore_testkit::{
    Postgres, Redis, RedisPersistence, TestApp, blocking, create_database, etag_version, shared,
    until,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn ready(app: &TestApp) -> (StatusCode, Value) {
    let response = app.http.get(app.url("/ready")).send().await.unwrap();
    (response.status(), response.json().await.unwrap())
}

fn tier_state(ready: &Value, tier: &str) -> String {
    ready["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == tier)
        .unwrap()["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Open, or half-open while a probe tries it: either way requests avoid it.
fn assert_routed_around(ready: &Value, tier: &str) {
    let state = tier_state(ready, tier);
    assert!(
        state == "open" || state == "half_open",
        "{tier} tier is {state}"
    );
}

#[tokio::test]
async fn both_tiers_down_answers_503_fast_and_service_resumes_when_they_return() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::None)).await);
    let app = TestApp::builder()
        .servers(postgres.clone(), redis.clone())
        .spawn()
        .await;
    let v1 = etag_version(&app.put("accounts", "a", json!({"n": 1})).await);
    assert_eq!(ready(&app).await.0, StatusCode::OK);

    let (pg, rd) = (postgres.clone(), redis.clone());
    blocking(move || {
        pg.kill();
        rd.kill();
    })
    .await;
    assert!(
        until(Duration::from_secs(5), || async {
            ready(&app).await.0 == StatusCode::SERVICE_UNAVAILABLE
        })
        .await,
        "both breakers open"
    );

    for i in 0..20 {
        let (method, path) = if i % 2 == 0 {
            (Method::GET, "/v1/collections/accounts/records/a")
        } else {
            (Method::PUT, "/v1/collections/accounts/records/b")
        };
        let started = Instant::now();
        let response = app
            .admin(method, path)
            .json(&json!({"n": i}))
            .send()
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key("retry-after"));
        assert!(elapsed < Duration::from_millis(50), "503 took {elapsed:?}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "backends_unavailable");
    }

    let (pg, rd) = (postgres.clone(), redis.clone());
    blocking(move || {
        rd.restart();
        pg.restart();
    })
    .await;
    // Whichever tier comes back first takes the write (the cache, which
    // cannot tell a create from a replace without PostgreSQL, answers 200).
    assert!(
        until(Duration::from_secs(10), || async {
            app.put("accounts", "b", json!({"n": 2}))
                .await
                .status()
                .is_success()
        })
        .await,
        "writes resume without restarting the service"
    );
    // Until PostgreSQL is back too, an emptied cache cannot answer for "a".
    assert!(
        until(Duration::from_secs(10), || async {
            app.get("accounts", "a").await.status() == StatusCode::OK
        })
        .await
    );
    assert_eq!(
        etag_version(&app.get("accounts", "a").await),
        v1,
        "the write acknowledged before the outage survived it"
    );
}

#[tokio::test]
async fn the_service_starts_with_postgres_down_and_recovers_when_it_comes_up() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let database = create_database(&postgres).await;
    let pg = postgres.clone();
    blocking(move || pg.stop()).await;
    let redis = blocking(|| shared().redis.clone()).await;

    let app = TestApp::builder()
        .servers(postgres.clone(), redis)
        .database(database)
        .spawn()
        .await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, StatusCode::OK, "the cache tier is usable: {body}");
    assert_routed_around(&body, "durable");
    let text = body.to_string();
    assert!(
        !text.contains("127.0.0.1") && !text.contains("error"),
        "an unauthenticated probe learns states, not errors: {text}"
    );
    // Writes are taken into Redis and its outage journal meanwhile.
    let accepted = app.put("accounts", "a", json!({"n": 1})).await;
    assert_eq!(accepted.status(), StatusCode::OK);
    let v1 = etag_version(&accepted);
    assert_eq!(etag_version(&app.get("accounts", "a").await), v1);

    let pg = postgres.clone();
    blocking(move || pg.restart()).await;
    assert!(
        until(Duration::from_secs(10), || async {
            tier_state(&ready(&app).await.1, "durable") == "closed"
        })
        .await,
        "the probe applies the schema and closes the breaker"
    );
    assert!(
        until(Duration::from_secs(10), || async {
            app.postgres_copy("accounts", "a").await.map(|c| c.version) == Some(v1)
        })
        .await,
        "the journal is replayed into PostgreSQL"
    );
    assert_eq!(tier_state(&ready(&app).await.1, "durable"), "closed");
    assert!(app.postgres_copy("accounts", "a").await.is_some());
}

#[tokio::test]
async fn the_service_starts_with_redis_down_serves_from_postgres_and_uses_redis_once_up() {
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::None)).await);
    let rd = redis.clone();
    blocking(move || rd.stop()).await;
    let postgres = blocking(|| shared().postgres.clone()).await;
    let app = TestApp::builder()
        .servers(postgres, redis.clone())
        .spawn()
        .await;
    assert_routed_around(&ready(&app).await.1, "cache");

    // With the cache breaker open, nothing waits on Redis.
    let started = Instant::now();
    let written = app.put("accounts", "a", json!({"n": 1})).await;
    assert_eq!(written.status(), StatusCode::CREATED);
    let read = app.get("accounts", "a").await;
    assert_eq!(etag_version(&read), etag_version(&written));
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "took {:?}",
        started.elapsed()
    );

    let rd = redis.clone();
    blocking(move || rd.restart()).await;
    assert!(
        until(Duration::from_secs(10), || async {
            app.get("accounts", "a").await;
            app.redis_copy("accounts", "a").await.is_some()
        })
        .await,
        "reads fill the cache again once Redis is up"
    );
}

#[tokio::test]
async fn with_postgres_down_cached_records_are_served_and_misses_answer_503() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = blocking(|| shared().redis.clone()).await;
    let app = TestApp::builder()
        .servers(postgres.clone(), redis)
        .spawn()
        .await;
    let v1 = etag_version(&app.put("accounts", "cached", json!({"n": 1})).await);
    app.put("accounts", "gone", json!({"n": 1})).await;
    app.delete("accounts", "gone").await;

    let pg = postgres.clone();
    blocking(move || pg.kill()).await;
    assert!(
        until(Duration::from_secs(5), || async {
            tier_state(&ready(&app).await.1, "durable") != "closed"
        })
        .await
    );
    let hit = app.get("accounts", "cached").await;
    assert_eq!(hit.status(), StatusCode::OK);
    assert_eq!(etag_version(&hit), v1);
    assert_eq!(
        app.get("accounts", "gone").await.status(),
        StatusCode::NOT_FOUND,
        "deletions are known"
    );
    assert_eq!(
        app.get("accounts", "never").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let listing = app
        .admin(Method::GET, "/v1/collections/accounts/records")
        .send()
        .await
        .unwrap();
    assert_eq!(
        listing.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "only PostgreSQL can list"
    );
}
