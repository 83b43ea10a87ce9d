//! The Redis tier on its own, against a real Redis: journal entries a
//! consumer took and never acknowledged (it died) are taken over by
//! another; what in Redis's configuration can lose data is named.

use std::time::Duration;

use hybridstore_core::prelude::*;
use hybridstore_core::{
    CacheWrite, CacheWriteOutcome, CollectionName, JournalAck, JournalKind, Precondition, RecordId,
    RecordKey, WriteChange,
};
use hybridstore_redis::{RedisOptions, RedisStore};
use hybridstore_testkit::{blocking, shared};
use serde_json::json;
use time::OffsetDateTime;

fn store(prefix: &str, url: String) -> RedisStore {
    RedisStore::new_lazy(&RedisOptions {
        url,
        key_prefix: prefix.to_owned(),
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(1),
        counter_idle: Duration::from_secs(300),
        counters_held: false,
    })
    .unwrap()
}

#[tokio::test]
async fn entries_a_dead_consumer_took_are_taken_over_and_replayed_once() {
    let redis = blocking(|| shared().redis.clone()).await;
    let prefix = format!("jt{}", std::process::id());
    let cache = store(&prefix, redis.url());
    let collection = CollectionName::parse("items").unwrap();
    let mut versions = Vec::new();
    for n in 0..10 {
        let write = CacheWrite {
            journal: Some(JournalKind::WriteBehind),
            key: RecordKey::new(
                collection.clone(),
                RecordId::parse(&format!("r{n}")).unwrap(),
            ),
            change: WriteChange::Put {
                data: json!({"n": n}).as_object().unwrap().clone(),
                expires_at: None,
            },
            precondition: Precondition::None,
            now: OffsetDateTime::now_utc(),
            deleted_marker_ttl: Duration::from_secs(60),
            unknown_state_ok: true,
            claims: Vec::new(),
        };
        match cache.accept_write(&write).await.unwrap() {
            CacheWriteOutcome::Written { version, .. } => versions.push(version),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        cache
            .journal_backlog(JournalKind::WriteBehind)
            .await
            .unwrap(),
        10
    );

    // The first consumer takes everything, then dies without acknowledging.
    let taken = cache
        .read_journal("dead", 100, Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(taken.len(), 10);

    // Nothing new for another consumer...
    let fresh = cache.read_journal("alive", 100, None).await.unwrap();
    assert!(
        fresh.is_empty(),
        "delivered entries are not delivered again as new"
    );
    // ...until it recovers: the idle entries are claimed, each exactly once.
    let claimed = cache
        .read_journal("alive", 100, Some(Duration::from_millis(1)))
        .await
        .unwrap();
    let mut claimed_versions: Vec<_> = claimed.iter().map(|entry| entry.change.version()).collect();
    claimed_versions.sort();
    assert_eq!(claimed_versions, versions);

    let acks: Vec<JournalAck> = claimed
        .iter()
        .map(|entry| JournalAck {
            key: entry.change.key(),
            position: entry.position.clone(),
            version: entry.change.version(),
            ttl: Duration::from_secs(60),
            superseded: false,
        })
        .collect();
    cache.ack_journal(&acks).await.unwrap();
    assert_eq!(
        cache
            .journal_backlog(JournalKind::WriteBehind)
            .await
            .unwrap(),
        0
    );
    assert!(
        cache
            .read_journal("alive", 100, Some(Duration::ZERO))
            .await
            .unwrap()
            .is_empty()
    );
    // Acknowledged copies are unpinned: they expire like any cached copy now.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = cache
        .keys()
        .record(&RecordKey::new(collection, RecordId::parse("r0").unwrap()));
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "unpinned copy has a TTL, got {ttl}");
}

/// An entry PostgreSQL refuses for good (here a string with U+0000, which
/// older versions accepted and Redis stores) sits in the journal ahead of
/// good ones. Replay sets it aside, says so in status and metrics, and goes
/// on: everything journaled after it reaches PostgreSQL.
#[tokio::test]
async fn an_entry_the_durable_tier_refuses_is_set_aside_and_replay_goes_on() {
    let app = hybridstore_testkit::TestApp::builder()
        .config("collections.groups.strategy", "cache_first")
        .spawn()
        .await;
    let before = app.put("groups", "bad", json!({"n": 0})).await;
    assert_eq!(before.status(), reqwest::StatusCode::CREATED);
    assert!(
        hybridstore_testkit::until(Duration::from_secs(10), || async {
            app.postgres_copy("groups", "bad").await.is_some()
        })
        .await
    );
    let (_, cache) = app.engine().raw_tiers();
    let unstorable = CacheWrite {
        journal: Some(JournalKind::WriteBehind),
        key: RecordKey::new(
            CollectionName::parse("groups").unwrap(),
            RecordId::parse("bad").unwrap(),
        ),
        change: WriteChange::Put {
            data: json!({"text": "a\u{0}b"}).as_object().unwrap().clone(),
            expires_at: None,
        },
        precondition: Precondition::None,
        now: OffsetDateTime::now_utc(),
        deleted_marker_ttl: Duration::from_secs(60),
        unknown_state_ok: false,
        claims: Vec::new(),
    };
    assert!(matches!(
        cache.accept_write(&unstorable).await.unwrap(),
        CacheWriteOutcome::Written { .. }
    ));
    let mut good = Vec::new();
    for n in 0..20 {
        let written = app.put("groups", &format!("g{n}"), json!({"n": n})).await;
        assert_eq!(written.status(), reqwest::StatusCode::CREATED);
        good.push(hybridstore_testkit::etag_version(&written));
    }
    assert!(
        hybridstore_testkit::until(Duration::from_secs(10), || async {
            app.journal_backlog().await == 0
        })
        .await,
        "the journal drains past the refused entry"
    );
    for (n, version) in good.iter().enumerate() {
        assert_eq!(
            app.postgres_copy("groups", &format!("g{n}"))
                .await
                .map(|c| c.version),
            Some(*version)
        );
    }
    let (_, status) = app
        .admin_call(reqwest::Method::GET, "/admin/database/status")
        .await;
    assert_eq!(status["journal_backlog"]["dead_letters"], json!(1));
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("hybridstore_journal_dead_letters 1"),
        "{metrics}"
    );
    // The durable tier stays the truth: the refused copy is not served.
    let read: serde_json::Value = app.get("groups", "bad").await.json().await.unwrap();
    assert_eq!(read["data"], json!({"n": 0}));
}

/// Where Redis holds a deployment's data, what in its configuration can
/// lose it is named: no append-only file, or a policy that evicts keys.
#[tokio::test]
async fn redis_says_what_in_its_configuration_can_lose_data() {
    use hybridstore_testkit::{Redis, RedisPersistence};
    let shared = blocking(|| shared().redis.clone()).await;
    let risks = store("dr", shared.url()).durability_risks().await.unwrap();
    assert!(
        risks.iter().any(|risk| risk.contains("appendonly is no")),
        "{risks:?}"
    );
    let own = blocking(|| Redis::start(RedisPersistence::AppendOnly)).await;
    let durable = store("dr", own.url());
    assert_eq!(
        durable.durability_risks().await.unwrap(),
        Vec::<String>::new()
    );
    let mut conn = redis::Client::open(own.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let risks = durable.durability_risks().await.unwrap();
    assert_eq!(risks.len(), 1, "{risks:?}");
    assert!(risks[0].contains("allkeys-lru"), "{risks:?}");
}
