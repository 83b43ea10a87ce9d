//! The records API round trip, and what each tier holds after each call.

use hybridstore_testkit::{StoredCopy, etag_version, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn crud_round_trip_keeps_both_tiers_on_the_same_version() {
    let app = spawn_app().await;

    // Create.
    let created = app
        .put("accounts", "acct-1", json!({"plan": "pro", "seats": 3}))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let v1 = etag_version(&created);
    let body: Value = created.json().await.unwrap();
    assert_eq!(body["version"], json!(v1));
    assert_eq!(body["collection"], "accounts");
    assert_eq!(body["id"], "acct-1");
    assert_eq!(body["data"], json!({"plan": "pro", "seats": 3}));
    let expected = StoredCopy {
        version: v1,
        data: json!({"plan": "pro", "seats": 3}),
    };
    assert_eq!(
        app.postgres_copy("accounts", "acct-1").await,
        Some(expected.clone())
    );
    assert_eq!(app.redis_copy("accounts", "acct-1").await, Some(expected));

    // Read.
    let read = app.get("accounts", "acct-1").await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(etag_version(&read), v1);
    let read: Value = read.json().await.unwrap();
    assert_eq!(read["data"]["plan"], "pro");

    // Replace.
    let replaced = app.put("accounts", "acct-1", json!({"plan": "team"})).await;
    assert_eq!(replaced.status(), StatusCode::OK);
    let v2 = etag_version(&replaced);
    assert!(v2 > v1, "versions increase: {v1} then {v2}");
    let replaced: Value = replaced.json().await.unwrap();
    assert_eq!(
        replaced["created_at"], body["created_at"],
        "created_at survives a replace"
    );
    let expected = StoredCopy {
        version: v2,
        data: json!({"plan": "team"}),
    };
    assert_eq!(
        app.postgres_copy("accounts", "acct-1").await,
        Some(expected.clone())
    );
    assert_eq!(app.redis_copy("accounts", "acct-1").await, Some(expected));

    // Merge patch.
    let patched = app
        .admin(Method::PATCH, "/v1/collections/accounts/records/acct-1")
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"seats": 5, "plan": null, "owner": {"name": "ada"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), StatusCode::OK);
    let v3 = etag_version(&patched);
    assert!(v3 > v2);
    let merged = json!({"seats": 5, "owner": {"name": "ada"}});
    let expected = StoredCopy {
        version: v3,
        data: merged.clone(),
    };
    assert_eq!(
        app.postgres_copy("accounts", "acct-1").await,
        Some(expected.clone())
    );
    assert_eq!(app.redis_copy("accounts", "acct-1").await, Some(expected));

    // Delete: gone from reads, a tombstone in PostgreSQL, a deletion marker in
    // Redis with a newer version than any the record had.
    let deleted = app.delete("accounts", "acct-1").await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.get("accounts", "acct-1").await.status(),
        StatusCode::NOT_FOUND
    );
    let (tombstone, is_deleted) = app.postgres_row("accounts", "acct-1").await.unwrap();
    assert!(is_deleted && tombstone.version > v3);
    assert_eq!(
        app.redis_entry("accounts", "acct-1").await,
        Some((tombstone.version, None))
    );
    let again = app.delete("accounts", "acct-1").await;
    assert_eq!(again.status(), StatusCode::NOT_FOUND);

    // Re-create: a creation again, continuing the version sequence.
    let recreated = app.put("accounts", "acct-1", json!({"plan": "free"})).await;
    assert_eq!(recreated.status(), StatusCode::CREATED);
    let v5 = etag_version(&recreated);
    assert!(v5 > tombstone.version);
    assert_eq!(
        app.redis_copy("accounts", "acct-1")
            .await
            .map(|c| c.version),
        Some(v5)
    );
    assert_eq!(app.get("accounts", "acct-1").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_cache_miss_is_served_from_postgres_and_fills_the_cache() {
    let app = spawn_app().await;
    let v = etag_version(&app.put("groups", "g1", json!({"name": "ops"})).await);
    // Drop the cached copy behind the service's back: the next read must come
    // from PostgreSQL and put the copy back.
    app.drop_cached_copy("groups", "g1").await;
    assert_eq!(app.redis_copy("groups", "g1").await, None);

    let read = app.get("groups", "g1").await;
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(etag_version(&read), v);
    assert_eq!(
        app.redis_copy("groups", "g1").await.map(|c| c.version),
        Some(v)
    );
    let ttl = app.redis_pttl("groups", "g1").await;
    assert!(
        ttl > 0 && ttl <= 3_600_000,
        "cache copy has the collection's TTL, got {ttl}"
    );
}

#[tokio::test]
async fn conditional_writes_and_reads() {
    let app = spawn_app().await;
    let path = "/v1/collections/settings/records/theme";
    let v1 = etag_version(&app.put("settings", "theme", json!({"color": "blue"})).await);

    // If-Match with a stale version: 412, nothing changes.
    let stale = app
        .admin(Method::PUT, path)
        .header("if-match", format!("\"{}\"", v1 - 1))
        .json(&json!({"color": "red"}))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(stale.headers()["content-type"], "application/problem+json");
    let problem: Value = stale.json().await.unwrap();
    assert_eq!(problem["code"], "version_conflict");
    let unchanged = StoredCopy {
        version: v1,
        data: json!({"color": "blue"}),
    };
    assert_eq!(
        app.postgres_copy("settings", "theme").await,
        Some(unchanged.clone())
    );
    assert_eq!(app.redis_copy("settings", "theme").await, Some(unchanged));

    // The same through PATCH and DELETE.
    for method in [Method::PATCH, Method::DELETE] {
        let response = app
            .admin(method.clone(), path)
            .header("if-match", "\"1\"")
            .json(&json!({"color": "red"}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::PRECONDITION_FAILED,
            "{method}"
        );
    }
    assert_eq!(
        app.postgres_copy("settings", "theme")
            .await
            .unwrap()
            .version,
        v1
    );

    // DELETE "only if absent" of a record that exists: 412, still there.
    let absent_only = app
        .admin(Method::DELETE, path)
        .header("if-none-match", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(absent_only.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(app.get("settings", "theme").await.status(), StatusCode::OK);

    // If-None-Match: * on an existing id: 412.
    let exists = app
        .admin(Method::PUT, path)
        .header("if-none-match", "*")
        .json(&json!({"color": "green"}))
        .send()
        .await
        .unwrap();
    assert_eq!(exists.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        app.postgres_copy("settings", "theme")
            .await
            .unwrap()
            .version,
        v1
    );

    // ...and on a new id it creates.
    let fresh = app
        .admin(Method::PUT, "/v1/collections/settings/records/lang")
        .header("if-none-match", "*")
        .json(&json!({"lang": "en"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), StatusCode::CREATED);

    // If-Match with the current version applies.
    let current = app
        .admin(Method::PUT, path)
        .header("if-match", format!("\"{v1}\""))
        .json(&json!({"color": "red"}))
        .send()
        .await
        .unwrap();
    assert_eq!(current.status(), StatusCode::OK);
    let v2 = etag_version(&current);

    // GET with If-None-Match: 304 for the current version, 200 for an old one.
    let cached = app
        .admin(Method::GET, path)
        .header("if-none-match", format!("\"{v2}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    let changed = app
        .admin(Method::GET, path)
        .header("if-none-match", format!("\"{v1}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
}

#[tokio::test]
async fn keyset_listing_with_prefix_and_cursor() {
    let app = spawn_app().await;
    for id in ["user:3", "user:1", "team:1", "user:2", "user:10"] {
        assert_eq!(
            app.put("accounts", id, json!({"id": id})).await.status(),
            StatusCode::CREATED
        );
    }
    app.delete("accounts", "user:2").await;

    let mut seen = Vec::new();
    let mut path = "/v1/collections/accounts/records?prefix=user:&limit=2".to_owned();
    loop {
        let page: Value = app
            .admin(Method::GET, &path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<String> = page["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(ids.len() <= 2);
        seen.extend(ids);
        match page["next"].as_str() {
            Some(next) => {
                path = format!("/v1/collections/accounts/records?prefix=user:&limit=2&after={next}")
            }
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["user:1", "user:10", "user:3"],
        "byte order, deleted record left out"
    );

    let all: Value = app
        .admin(Method::GET, "/v1/collections/accounts/records")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["records"].as_array().unwrap().len(), 4);
    assert_eq!(all["next"], Value::Null);
}

#[tokio::test]
async fn batch_get_returns_found_records_in_order_and_the_missing_ids() {
    let app = spawn_app().await;
    for id in ["a", "b", "c"] {
        app.put("groups", id, json!({"name": id})).await;
    }
    // "b" only in PostgreSQL (cache copy dropped), "a" and "c" in both.
    app.drop_cached_copy("groups", "b").await;
    app.delete("groups", "c").await;

    let response = app
        .admin(Method::POST, "/v1/collections/groups/batch-get")
        .json(&json!({"ids": ["c", "b", "nope", "a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let found: Vec<&str> = body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(found, ["b", "a"]);
    assert_eq!(body["missing"], json!(["c", "nope"]));
    assert!(
        app.redis_copy("groups", "b").await.is_some(),
        "the miss was filled"
    );
}

#[tokio::test]
async fn collections_are_listed_with_their_policies() {
    let app = spawn_app().await;
    let body: Value = app
        .admin(Method::GET, "/v1/collections")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let collections = body["collections"].as_array().unwrap();
    let names: Vec<&str> = collections
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for expected in [
        "api_keys",
        "sessions",
        "accounts",
        "users",
        "mcp_servers",
        "groups",
        "settings",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let api_keys = collections
        .iter()
        .find(|c| c["name"] == "api_keys")
        .unwrap();
    assert_eq!(api_keys["unique_indexes"], json!(["key_hash"]));
    assert_eq!(api_keys["effective_strategy"], "dual_write");
    let sessions = collections
        .iter()
        .find(|c| c["name"] == "sessions")
        .unwrap();
    assert_eq!(sessions["record_ttl_secs"], 86400);
}
