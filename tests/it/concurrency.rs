//! Concurrent writers, and the race between a slow cache fill and a write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hybridstore_testkit::{HookedDurable, TestApp, etag_version, spawn_app};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn fifty_concurrent_writers_get_distinct_versions_and_the_tiers_agree() {
    let app = Arc::new(spawn_app().await);
    app.put("accounts", "hot", json!({"writer": -1})).await;
    let acknowledged = Arc::new(AtomicU64::new(0));
    let writing = Arc::new(AtomicBool::new(true));

    // Readers run through the writes and check read-your-writes: a read started
    // after a write was acknowledged returns that version or a newer one.
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (app, acknowledged, writing) = (app.clone(), acknowledged.clone(), writing.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0;
            while writing.load(Ordering::SeqCst) {
                let floor = acknowledged.load(Ordering::SeqCst);
                let response = app.get("accounts", "hot").await;
                assert_eq!(response.status(), StatusCode::OK);
                let version = etag_version(&response);
                assert!(
                    version >= floor,
                    "read returned v{version} after v{floor} was acknowledged"
                );
                reads += 1;
            }
            reads
        }));
    }

    let writers: Vec<_> = (0..50)
        .map(|writer| {
            let (app, acknowledged) = (app.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let response = app.put("accounts", "hot", json!({"writer": writer})).await;
                assert_eq!(response.status(), StatusCode::OK);
                let version = etag_version(&response);
                acknowledged.fetch_max(version, Ordering::SeqCst);
                (version, writer)
            })
        })
        .collect();
    let mut results = Vec::new();
    for writer in writers {
        results.push(writer.await.unwrap());
    }
    writing.store(false, Ordering::SeqCst);
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "each reader read at least once");
    }

    let mut versions: Vec<u64> = results.iter().map(|(v, _)| *v).collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), 50, "every write got its own version");

    // The write with the highest version is the one both tiers hold.
    let (last_version, last_writer) = *results.iter().max().unwrap();
    let expected = Some(hybridstore_testkit::StoredCopy {
        version: last_version,
        data: json!({"writer": last_writer}),
    });
    assert_eq!(app.postgres_copy("accounts", "hot").await, expected);
    assert_eq!(app.redis_copy("accounts", "hot").await, expected);
}

async fn app_with_gate() -> (Arc<TestApp>, Arc<HookedDurable>) {
    let (builder, hooked) = TestApp::builder().hooked();
    (Arc::new(builder.spawn().await), hooked)
}

/// Starts a GET that misses the cache, reads PostgreSQL and is then held before
/// its cache fill. Returns the pending read.
async fn start_held_read(
    app: &Arc<TestApp>,
    gate: &HookedDurable,
    id: &str,
) -> tokio::task::JoinHandle<reqwest::Response> {
    app.drop_cached_copy("accounts", id).await;
    gate.hold_next_get();
    let reader = {
        let (app, id) = (app.clone(), id.to_owned());
        tokio::spawn(async move { app.get("accounts", &id).await })
    };
    gate.get_reached().await;
    reader
}

#[tokio::test]
async fn a_slow_reader_cannot_fill_the_cache_over_a_newer_write() {
    let (app, gate) = app_with_gate().await;
    let v1 = etag_version(&app.put("accounts", "acct", json!({"n": 1})).await);

    let reader = start_held_read(&app, &gate, "acct").await;
    // The reader holds v1 from PostgreSQL; a writer commits v2 meanwhile.
    let v2 = etag_version(&app.put("accounts", "acct", json!({"n": 2})).await);
    assert!(v2 > v1);
    gate.release_get();
    let held = reader.await.unwrap();
    assert_eq!(
        etag_version(&held),
        v1,
        "the held read answers what it read"
    );

    let cached = app
        .redis_copy("accounts", "acct")
        .await
        .expect("cached copy");
    assert_eq!(cached.version, v2, "the stale fill was rejected");
    assert_eq!(cached.data, json!({"n": 2}));
    assert_eq!(etag_version(&app.get("accounts", "acct").await), v2);
}

#[tokio::test]
async fn a_slow_reader_cannot_resurrect_a_deleted_record_in_the_cache() {
    let (app, gate) = app_with_gate().await;
    let v1 = etag_version(&app.put("accounts", "gone", json!({"n": 1})).await);

    let reader = start_held_read(&app, &gate, "gone").await;
    let deleted = app.delete("accounts", "gone").await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    gate.release_get();
    assert_eq!(etag_version(&reader.await.unwrap()), v1);

    let (marker, data) = app
        .redis_entry("accounts", "gone")
        .await
        .expect("deletion marker");
    assert!(
        marker > v1 && data.is_none(),
        "the cache keeps the deletion, not v{v1}"
    );
    assert_eq!(
        app.get("accounts", "gone").await.status(),
        StatusCode::NOT_FOUND
    );
    let body: Value = app.get("accounts", "gone").await.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
}
