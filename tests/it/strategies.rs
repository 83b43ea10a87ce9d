//! The strategy matrix: for each strategy, which tiers a write and a read
//! touch, observed by looking into Redis and PostgreSQL directly.

use std::time::Duration;

use hybridstore_testkit::{TestApp, etag_version};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// An app whose `items` collection follows `strategy`.
async fn app_with(strategy: &str) -> TestApp {
    TestApp::builder()
        .config("collections.items.strategy", strategy)
        .spawn()
        .await
}

/// Changes the data PostgreSQL holds, behind the service's back.
async fn rewrite_in_postgres(app: &TestApp, id: &str, data: Value) {
    sqlx::query("UPDATE records SET data = $1 WHERE collection = 'items' AND id = $2")
        .bind(sqlx::types::Json(data))
        .bind(id)
        .execute(&app.pg().db)
        .await
        .unwrap();
}

/// One page of `items`: the ids and the `next` cursor.
async fn list_page(app: &TestApp, query: &str) -> (Vec<String>, Value) {
    let path = format!("/v1/collections/items/records?{query}");
    let page: Value = app
        .admin(reqwest::Method::GET, &path)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record["id"].as_str().unwrap().to_owned())
        .collect();
    (ids, page["next"].clone())
}

async fn read_data(app: &TestApp, id: &str) -> Value {
    let body: Value = app.get("items", id).await.json().await.unwrap();
    body["data"].clone()
}

async fn eventually_in_postgres(app: &TestApp, id: &str, version: u64) -> bool {
    for _ in 0..100 {
        if app.postgres_copy("items", id).await.map(|c| c.version) == Some(version) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn dual_write_commits_to_postgres_then_caches_and_reads_the_cache() {
    let app = app_with("dual_write").await;
    let v = etag_version(&app.put("items", "a", json!({"n": 1})).await);
    assert_eq!(
        app.postgres_copy("items", "a").await.map(|c| c.version),
        Some(v)
    );
    assert_eq!(
        app.redis_copy("items", "a").await.map(|c| c.version),
        Some(v)
    );
    assert_eq!(app.journal_backlog().await, 0, "nothing journaled");
    rewrite_in_postgres(&app, "a", json!({"n": "changed behind"})).await;
    assert_eq!(
        read_data(&app, "a").await,
        json!({"n": 1}),
        "read from the cache"
    );
}

#[tokio::test]
async fn database_first_commits_to_postgres_keeps_the_cache_warm_and_reads_postgres() {
    let app = app_with("database_first").await;
    let v = etag_version(&app.put("items", "a", json!({"n": 1})).await);
    assert_eq!(
        app.postgres_copy("items", "a").await.map(|c| c.version),
        Some(v)
    );
    assert_eq!(
        app.redis_copy("items", "a").await.map(|c| c.version),
        Some(v),
        "kept warm"
    );
    rewrite_in_postgres(&app, "a", json!({"n": "from postgres"})).await;
    assert_eq!(
        read_data(&app, "a").await,
        json!({"n": "from postgres"}),
        "read from PostgreSQL"
    );
}

#[tokio::test]
async fn postgres_only_never_touches_redis() {
    let app = app_with("postgres_only").await;
    let v = etag_version(&app.put("items", "a", json!({"n": 1})).await);
    assert_eq!(
        app.postgres_copy("items", "a").await.map(|c| c.version),
        Some(v)
    );
    assert_eq!(app.get("items", "a").await.status(), StatusCode::OK);
    app.delete("items", "a").await;
    assert_eq!(app.redis_keys().await, Vec::<String>::new());
    assert_eq!(app.journal_backlog().await, 0);
}

#[tokio::test]
async fn cache_first_acknowledges_from_redis_and_writes_postgres_behind() {
    let app = app_with("cache_first").await;
    let created = app.put("items", "a", json!({"n": 1})).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let v1 = etag_version(&created);
    assert_eq!(
        app.redis_copy("items", "a").await.map(|c| c.version),
        Some(v1)
    );
    assert!(
        eventually_in_postgres(&app, "a", v1).await,
        "replayed into PostgreSQL"
    );

    // A burst: every version reaches PostgreSQL, the journal drains.
    let mut last = v1;
    for n in 2..=50 {
        let response = app.put("items", "a", json!({"n": n})).await;
        assert_eq!(response.status(), StatusCode::OK);
        let v = etag_version(&response);
        assert!(v > last);
        last = v;
        assert_eq!(
            etag_version(&app.get("items", "a").await),
            v,
            "read-your-writes from the cache"
        );
    }
    assert!(eventually_in_postgres(&app, "a", last).await);
    assert_eq!(
        app.postgres_copy("items", "a").await.unwrap().data,
        json!({"n": 50})
    );
    for _ in 0..100 {
        if app.journal_backlog().await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.journal_backlog().await, 0, "the journal drained");

    // Deletes go the same way.
    assert_eq!(
        app.delete("items", "a").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.get("items", "a").await.status(), StatusCode::NOT_FOUND);
    let mut deleted = false;
    for _ in 0..100 {
        if matches!(app.postgres_row("items", "a").await, Some((_, true))) {
            deleted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(deleted, "the delete was replayed as a tombstone");

    // Preconditions are checked by the cache, atomically with the write.
    let stale = app
        .admin(reqwest::Method::PUT, "/v1/collections/items/records/b")
        .header("if-match", "\"1\"")
        .json(&json!({"n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
}

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
async fn redis_only_keeps_records_in_redis_alone() {
    let app = app_with("redis_only").await;
    let created = app.put("items", "a", json!({"n": 1})).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let v1 = etag_version(&created);
    assert_eq!(
        app.redis_copy("items", "a").await.map(|c| c.version),
        Some(v1)
    );
    assert_eq!(
        app.postgres_row("items", "a").await,
        None,
        "PostgreSQL is never written"
    );
    assert_eq!(app.journal_backlog().await, 0, "nothing journaled");
    assert_eq!(
        app.redis_pttl("items", "a").await,
        -1,
        "no cache expiry: Redis is the truth"
    );
    assert_eq!(
        app.get("items", "missing").await.status(),
        StatusCode::NOT_FOUND,
        "a miss is a 404"
    );

    let replaced = app.put("items", "a", json!({"n": 2})).await;
    assert_eq!(replaced.status(), StatusCode::OK);
    assert!(etag_version(&replaced) > v1);
    for id in ["b", "c", "d"] {
        app.put("items", id, json!({"id": id})).await;
    }
    assert_eq!(
        app.delete("items", "c").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.get("items", "c").await.status(), StatusCode::NOT_FOUND);

    let (ids, next) = list_page(&app, "limit=2").await;
    assert_eq!(
        (ids, next),
        (vec!["a".to_owned(), "b".to_owned()], json!("b"))
    );
    let (ids, next) = list_page(&app, "limit=2&after=b").await;
    assert_eq!(ids, ["d"], "deleted records are not listed");
    assert_eq!(next, Value::Null);

    // Record TTL: the key expires with the record.
    let temp = app
        .admin(
            reqwest::Method::PUT,
            "/v1/collections/items/records/temp?ttl=1",
        )
        .json(&json!({"n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(temp.status(), StatusCode::CREATED);
    let ttl = app.redis_pttl("items", "temp").await;
    assert!((1..=1000).contains(&ttl), "PTTL {ttl}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        app.get("items", "temp").await.status(),
        StatusCode::NOT_FOUND
    );
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
    use hybridstore_testkit::{create_database, shared};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let servers = tokio::task::spawn_blocking(shared).await.unwrap();
    let database = create_database(&servers.postgres).await;
    let prefix = format!("pair{}", std::process::id());
    let mut instances = Vec::new();
    for _ in 0..2 {
        let app = TestApp::builder()
            .database(database.clone())
            .key_prefix(prefix.clone())
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
