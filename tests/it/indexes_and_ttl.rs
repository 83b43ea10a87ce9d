//! Unique indexes and record expiry.

use std::time::Duration;

use hybridstore_testkit::{TestApp, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn a_duplicate_unique_value_is_refused_and_lookup_finds_the_first() {
    let app = spawn_app().await;
    let first = app
        .put(
            "api_keys",
            "key-1",
            json!({"key_hash": "h-abc", "owner": "ada"}),
        )
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);

    let second = app
        .put(
            "api_keys",
            "key-2",
            json!({"key_hash": "h-abc", "owner": "eve"}),
        )
        .await;
    assert_eq!(second.status(), StatusCode::CONFLICT);
    let problem: Value = second.json().await.unwrap();
    assert_eq!(problem["code"], "unique_violation");
    assert_eq!(
        app.postgres_row("api_keys", "key-2").await,
        None,
        "nothing written"
    );
    assert_eq!(app.redis_entry("api_keys", "key-2").await, None);

    for _ in 0..2 {
        // Twice: once from PostgreSQL (filling the cache), once from the cache.
        let found = app.lookup("api_keys", "key_hash", "h-abc").await;
        assert_eq!(found.status(), StatusCode::OK);
        let found: Value = found.json().await.unwrap();
        assert_eq!(found["id"], "key-1");
        assert_eq!(found["data"]["owner"], "ada");
    }

    // Changing the value frees the old one; the lookup follows.
    app.put(
        "api_keys",
        "key-1",
        json!({"key_hash": "h-new", "owner": "ada"}),
    )
    .await;
    let old = app.lookup("api_keys", "key_hash", "h-abc").await;
    assert_eq!(old.status(), StatusCode::NOT_FOUND);
    let reuse = app
        .put("api_keys", "key-2", json!({"key_hash": "h-abc"}))
        .await;
    assert_eq!(reuse.status(), StatusCode::CREATED);
    let now_second: Value = app
        .lookup("api_keys", "key_hash", "h-abc")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(now_second["id"], "key-2");

    // A conflicting update leaves the record as it was.
    let clash = app
        .put("api_keys", "key-1", json!({"key_hash": "h-abc"}))
        .await;
    assert_eq!(clash.status(), StatusCode::CONFLICT);
    let kept = app.postgres_copy("api_keys", "key-1").await.unwrap();
    assert_eq!(kept.data["key_hash"], "h-new");

    // An unknown index is a 404.
    let unknown = app.lookup("api_keys", "owner", "ada").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn concurrent_claims_of_one_value_leave_exactly_one_winner() {
    let app = std::sync::Arc::new(spawn_app().await);
    for round in 0..5 {
        let username = format!("root{round}");
        let attempts: Vec<_> = (0..30)
            .map(|i| {
                let (app, username) = (app.clone(), username.clone());
                tokio::spawn(async move {
                    let id = format!("r{round}u{i}");
                    app.put("users", &id, json!({"username": username}))
                        .await
                        .status()
                })
            })
            .collect();
        let mut created = 0;
        for attempt in attempts {
            match attempt.await.unwrap() {
                StatusCode::CREATED => created += 1,
                StatusCode::CONFLICT => {}
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(created, 1, "exactly one claim of {username} wins");
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM records WHERE collection = 'users' AND NOT deleted AND data->>'username' = $1",
        )
        .bind(&username)
        .fetch_one(&app.pg().db)
        .await
        .unwrap();
        assert_eq!(live, 1, "exactly one live record holds {username}");
    }
}

#[tokio::test]
async fn an_expired_record_is_gone_from_get_and_lookup_in_both_tiers() {
    let app = spawn_app().await;
    let response = app
        .admin(Method::PUT, "/v1/collections/api_keys/records/temp?ttl=1")
        .json(&json!({"key_hash": "h-temp"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    assert!(body["expires_at"].is_string());
    let ttl = app.redis_pttl("api_keys", "temp").await;
    assert!(
        (1..=1000).contains(&ttl),
        "the cache copy expires with the record, PTTL {ttl}"
    );
    assert_eq!(
        app.lookup("api_keys", "key_hash", "h-temp").await.status(),
        StatusCode::OK
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        app.get("api_keys", "temp").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.lookup("api_keys", "key_hash", "h-temp").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.redis_entry("api_keys", "temp").await,
        None,
        "Redis expired the copy"
    );

    // The purge task (every 200 ms in tests) removes the row from PostgreSQL.
    let mut purged = false;
    for _ in 0..50 {
        if app.postgres_row("api_keys", "temp").await.is_none() {
            purged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(purged, "the expired row was purged from PostgreSQL");

    // The value is free again.
    let reuse = app
        .put("api_keys", "other", json!({"key_hash": "h-temp"}))
        .await;
    assert_eq!(reuse.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn an_expired_holder_does_not_block_its_unique_value() {
    // The purge task runs once at start, then not again during this test.
    let app = TestApp::builder()
        .config("records.purge_interval_ms", 3_600_000)
        .spawn()
        .await;
    let response = app
        .admin(Method::PUT, "/v1/collections/users/records/old?ttl=1")
        .json(&json!({"username": "taken"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        app.postgres_row("users", "old").await.is_some(),
        "not purged yet"
    );
    let claim = app.put("users", "new", json!({"username": "taken"})).await;
    assert_eq!(claim.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_collection_record_ttl_applies_by_default() {
    let app = spawn_app().await;
    let body: Value = app
        .put("sessions", "s1", json!({"user": "ada"}))
        .await
        .json()
        .await
        .unwrap();
    let expires = time::OffsetDateTime::parse(
        body["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::hours(23) && left <= time::Duration::hours(24),
        "sessions live a day: {left}"
    );
}
