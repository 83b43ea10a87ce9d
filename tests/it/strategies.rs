//! Strategy behaviour that only the production pair has: Redis restarts,
//! several instances sharing one Redis, and configuration refusals. The
//! strategy matrix itself (which tiers a write and a read touch) runs on
//! both tier pairs in `engine_suite`.

use std::time::Duration;

use hybridstore_testkit::{Deployment, TestApp, etag_version};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn cache_first_cannot_declare_unique_indexes() {
    let figment = hybridstore_server::Config::builtin_figment()
        .merge(("admin_token", "0123456789abcdef0123"))
        .merge(("postgres.url", "postgres://u@localhost/db"))
        .merge(("redis.url", "redis://localhost"))
        .merge(("collections.api_keys.strategy", "cache_first"));
    let err = hybridstore_server::Config::from_figment(figment)
        .unwrap_err()
        .to_string();
    assert!(err.contains("collections.api_keys.unique_indexes"), "{err}");
}

#[tokio::test]
async fn a_redis_restart_cleans_cached_copies_but_keeps_redis_only_records() {
    use hybridstore_testkit::{Redis, RedisPersistence, shared};
    use std::sync::Arc;
    let redis = Arc::new(
        tokio::task::spawn_blocking(|| Redis::start(RedisPersistence::AppendOnly))
            .await
            .unwrap(),
    );
    let postgres = tokio::task::spawn_blocking(|| shared().postgres.clone())
        .await
        .unwrap();
    let app = TestApp::builder()
        .servers(postgres, redis.clone())
        .config("collections.items.strategy", "redis_only")
        .spawn()
        .await;
    let v = etag_version(&app.put("items", "only", json!({"n": 1})).await);
    app.put("accounts", "cached", json!({"n": 1})).await;
    assert!(app.redis_copy("accounts", "cached").await.is_some());
    tokio::time::sleep(Duration::from_millis(1200)).await; // appendfsync everysec

    let server = redis.clone();
    tokio::task::spawn_blocking(move || server.restart())
        .await
        .unwrap();
    // The restart (new run_id) makes recovery remove every cached copy...
    let mut cleaned = false;
    for _ in 0..100 {
        app.get("items", "only").await;
        if app.redis_copy("accounts", "cached").await.is_none() {
            cleaned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cleaned,
        "the cached copy of a PostgreSQL record was removed"
    );
    // ...but not the records whose only copy is in Redis.
    let read = app.get("items", "only").await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(etag_version(&read), v);
}

#[tokio::test]
async fn two_instances_share_one_write_behind_journal_and_lose_nothing() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let deployment = Deployment::new("pair").await;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let app = deployment
            .instance()
            .config("collections.items.strategy", "cache_first")
            .spawn()
            .await;
        instances.push(Arc::new(app));
    }

    // Four clients write ten records each, five times, alternating instances.
    let acked: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (instances, acked) = (instances.clone(), acked.clone());
            tokio::spawn(async move {
                for round in 0..5u64 {
                    for k in 0..10 {
                        let id = format!("c{client}-{k}");
                        let app = &instances[(round as usize + k) % 2];
                        let response = app.put("items", &id, json!({"round": round})).await;
                        assert!(response.status().is_success(), "{}", response.status());
                        let version = etag_version(&response);
                        let previous = acked.lock().unwrap().insert(id.clone(), (version, round));
                        assert!(
                            previous.is_none_or(|(v, _)| v < version),
                            "{id}: versions go up across instances"
                        );
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    let mut caught_up = false;
    for _ in 0..200 {
        let mut all = instances[0].journal_backlog().await == 0;
        for (id, (version, _)) in &acked {
            all &= instances[0]
                .postgres_copy("items", id)
                .await
                .map(|c| c.version)
                == Some(*version);
        }
        if all {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        caught_up,
        "both instances' writes reached PostgreSQL and the journal drained"
    );
    for (id, (_, round)) in &acked {
        assert_eq!(
            instances[0].postgres_copy("items", id).await.unwrap().data,
            json!({"round": round})
        );
    }
}
