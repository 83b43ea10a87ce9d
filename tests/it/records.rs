//! The records API round trip, and what each tier holds after each call.

use hybridstore_testkit::{StoredCopy, TestApp, etag_version, spawn_app};
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

/// A 200 answer of at most the default `limits.page_bytes` (4 MiB) of data,
/// plus its envelope, parsed.
async fn within_page_bytes(answer: reqwest::Response, what: &str) -> Value {
    assert_eq!(answer.status(), StatusCode::OK, "{what}");
    let bytes = answer.bytes().await.unwrap();
    assert!(
        bytes.len() < 4 * 1024 * 1024 + 64 * 1024,
        "{what}: an answer of {} bytes",
        bytes.len()
    );
    serde_json::from_slice(&bytes).unwrap()
}

/// A list page is bounded in bytes as well as in count (`limits.page_bytes`,
/// 4 MiB by default), by the tier's own query: ten records of 700 KiB
/// asked for with `limit=1000` come in pages of at most 4 MiB of data, each
/// saying where the next starts, and together hold every record once. In
/// both modes, from the durable tier and from the cache (redis_only lists
/// from the cache alone).
#[tokio::test]
async fn list_pages_are_bounded_in_bytes() {
    for (embedded, strategy) in [
        (false, "dual_write"),
        (false, "redis_only"),
        (true, "dual_write"),
        (true, "redis_only"),
    ] {
        let mut builder = TestApp::builder().config("collections.accounts.strategy", strategy);
        if embedded {
            builder = builder.embedded();
        }
        let app = builder.spawn().await;
        let what = format!("{strategy}, embedded: {embedded}");
        let blob = "x".repeat(700 * 1024);
        for n in 0..10 {
            let put = app
                .put("accounts", &format!("r{n}"), json!({"blob": blob}))
                .await;
            assert!(put.status().is_success(), "{what}");
        }
        let mut seen = Vec::new();
        let mut after = String::new();
        let mut pages = 0;
        let cursor = |after: &str| {
            if after.is_empty() {
                String::new()
            } else {
                format!("&after={after}")
            }
        };
        loop {
            let answer = app
                .admin(
                    reqwest::Method::GET,
                    &format!(
                        "/v1/collections/accounts/records?limit=1000{}",
                        cursor(&after)
                    ),
                )
                .send()
                .await
                .unwrap();
            let page = within_page_bytes(answer, &what).await;
            seen.extend(hybridstore_testkit::record_ids(&page));
            pages += 1;
            match page["next"].as_str() {
                Some(next) => after = next.to_owned(),
                None => break,
            }
        }
        let expected: Vec<String> = (0..10).map(|n| format!("r{n}")).collect();
        assert_eq!(seen, expected, "{what}: every record once, in order");
        assert_eq!(pages, 2, "{what}: 5 records of 700 KiB fit in 4 MiB");
    }
}

/// A batch-get answer is bounded in bytes too: ten records of 700 KiB asked
/// for at once come back as the first five (4 MiB of data at most), in the
/// order asked, with the other ids under `unread`; the missing id is still
/// named. Both modes.
#[tokio::test]
async fn batch_get_answers_are_bounded_in_bytes() {
    for app in [
        TestApp::builder().spawn().await,
        TestApp::builder().embedded().spawn().await,
    ] {
        let what = format!("embedded: {}", app.is_embedded());
        let blob = "z".repeat(700 * 1024);
        for n in 0..10 {
            let put = app
                .put("accounts", &format!("b{n}"), json!({"blob": blob}))
                .await;
            assert!(put.status().is_success(), "{what}");
        }
        let mut ids: Vec<String> = (0..10).rev().map(|n| format!("b{n}")).collect();
        ids.insert(0, "nope".to_owned());
        let answer = app
            .admin(Method::POST, "/v1/collections/accounts/batch-get")
            .json(&json!({ "ids": ids }))
            .send()
            .await
            .unwrap();
        let body = within_page_bytes(answer, &what).await;
        let read = hybridstore_testkit::record_ids(&body);
        assert_eq!(read, ["b9", "b8", "b7", "b6", "b5"], "{what}");
        assert_eq!(body["missing"], json!(["nope"]), "{what}");
        assert_eq!(
            body["unread"],
            json!(["b4", "b3", "b2", "b1", "b0"]),
            "{what}"
        );
    }
}
