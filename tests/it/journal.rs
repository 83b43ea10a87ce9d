//! The journal at the tier level, against a real Redis: entries a consumer
//! took and never acknowledged (it died) are taken over by another.

use std::time::Duration;

use hybridstore_core::{
    CacheStore, CacheWrite, CacheWriteOutcome, CollectionName, JournalAck, JournalKind,
    Precondition, RecordId, RecordKey, WriteChange,
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
