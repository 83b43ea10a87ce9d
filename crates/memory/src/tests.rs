//! The rules the engine relies on, checked on the in-process tier alone.
//! (The engine suite in `tests/it` runs the whole service over it too.)

use super::*;
use hybridstore_core::Precondition;

fn key(id: &str) -> RecordKey {
    RecordKey::new(
        CollectionName::parse("items").unwrap(),
        RecordId::parse(id).unwrap(),
    )
}

fn record(id: &str, version: u64) -> Record {
    let now = OffsetDateTime::now_utc();
    Record {
        collection: CollectionName::parse("items").unwrap(),
        id: RecordId::parse(id).unwrap(),
        version: Version::new(version),
        data: serde_json::json!({ "v": version })
            .as_object()
            .unwrap()
            .clone(),
        created_at: now,
        updated_at: now,
        expires_at: None,
    }
}

fn journaled_put(id: &str) -> CacheWrite {
    CacheWrite {
        journal: Some(JournalKind::WriteBehind),
        key: key(id),
        change: WriteChange::Put {
            data: Default::default(),
            expires_at: None,
        },
        precondition: Precondition::None,
        now: OffsetDateTime::now_utc(),
        deleted_marker_ttl: Duration::from_secs(60),
        unknown_state_ok: true,
        claims: Vec::new(),
    }
}

#[tokio::test]
async fn an_older_copy_never_replaces_a_newer_one() {
    let cache = MemoryCache::new(100, 64 << 20);
    let ttl = Duration::from_secs(60);
    assert!(cache.store(&record("a", 5), ttl).await.unwrap());
    assert!(!cache.store(&record("a", 4), ttl).await.unwrap());
    assert!(
        !cache
            .store_deleted(&key("a"), Version::new(5), ttl)
            .await
            .unwrap()
    );
    assert!(
        cache
            .store_deleted(&key("a"), Version::new(6), ttl)
            .await
            .unwrap()
    );
    assert_eq!(
        cache.get(&key("a")).await.unwrap(),
        CacheEntry::Deleted(Version::new(6))
    );
}

#[tokio::test]
async fn a_journaled_write_stays_pinned_until_acknowledged_and_is_redelivered_if_not() {
    let cache = MemoryCache::new(100, 64 << 20);
    let outcome = cache.accept_write(&journaled_put("a")).await.unwrap();
    let CacheWriteOutcome::Written { version, .. } = outcome else {
        panic!("{outcome:?}")
    };
    cache.invalidate(&[key("a")]).await.unwrap();
    assert!(
        matches!(cache.get(&key("a")).await.unwrap(), CacheEntry::Present(_)),
        "pinned"
    );

    let first = cache.read_journal("one", 10, None).await.unwrap();
    assert_eq!(first.len(), 1);
    assert!(
        cache
            .read_journal("one", 10, None)
            .await
            .unwrap()
            .is_empty(),
        "delivered once"
    );
    let again = cache
        .read_journal("one", 10, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(
        again.len(),
        1,
        "its own unacknowledged entry comes back on recovery"
    );
    let other = cache
        .read_journal("two", 10, Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(
        other.len(),
        1,
        "an idle entry is claimed by another consumer"
    );

    cache
        .ack_journal(&[JournalAck {
            key: other[0].change.key(),
            position: other[0].position.clone(),
            version,
            ttl: Duration::from_secs(60),
            superseded: false,
        }])
        .await
        .unwrap();
    assert_eq!(
        cache
            .journal_backlog(JournalKind::WriteBehind)
            .await
            .unwrap(),
        0
    );
    cache.invalidate(&[key("a")]).await.unwrap();
    assert_eq!(
        cache.get(&key("a")).await.unwrap(),
        CacheEntry::Miss,
        "unpinned"
    );
}

#[tokio::test]
async fn eviction_keeps_pinned_copies_and_memory_bounded() {
    let cache = MemoryCache::new(100, 64 << 20);
    cache.accept_write(&journaled_put("pinned")).await.unwrap();
    for n in 0..500 {
        cache
            .store(&record(&format!("r{n}"), 1), Duration::from_secs(60))
            .await
            .unwrap();
    }
    assert!(cache.lock().record_count <= 100);
    assert!(matches!(
        cache.get(&key("pinned")).await.unwrap(),
        CacheEntry::Present(_)
    ));
}

#[tokio::test]
async fn a_scan_sees_every_entry_present_throughout_even_while_others_go() {
    let cache = MemoryCache::new(1000, 64 << 20);
    let collection = CollectionName::parse("items").unwrap();
    for n in 0..50 {
        cache
            .store(&record(&format!("r{n:02}"), 1), Duration::from_secs(60))
            .await
            .unwrap();
    }
    let (mut cursor, mut seen) = (0, Vec::new());
    loop {
        let (next, page) = cache.scan(&collection, cursor, 7).await.unwrap();
        seen.extend(page.into_iter().map(|s| s.state.key().id.to_string()));
        // Entries already seen vanish meanwhile: the rest must still come.
        cache.invalidate(&[key("r00"), key("r01")]).await.unwrap();
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let expected: Vec<String> = (0..50).map(|n| format!("r{n:02}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn copies_are_bounded_in_bytes_and_pinned_ones_are_never_evicted() {
    let cache = MemoryCache::new(100_000, 1 << 20);
    let ttl = Duration::from_secs(60);
    let big = |id: &str| {
        let mut record = record(id, 1);
        record
            .data
            .insert("blob".into(), serde_json::json!("x".repeat(100 * 1024)));
        record
    };
    cache.accept_write(&journaled_put("pinned")).await.unwrap();
    for n in 0..30 {
        cache.store(&big(&format!("b{n}")), ttl).await.unwrap();
    }
    let held = cache.lock().record_bytes;
    assert!(
        held <= 1 << 20,
        "30 copies of 100 KiB kept within 1 MiB: {held}"
    );
    assert!(
        matches!(
            cache.get(&key("b29")).await.unwrap(),
            CacheEntry::Present(_)
        ),
        "the newest copy is held"
    );
    assert!(
        matches!(
            cache.get(&key("pinned")).await.unwrap(),
            CacheEntry::Present(_)
        ),
        "a journaled copy is never evicted"
    );
    // Replacing and removing copies keeps the count exact.
    cache.invalidate_all(true).await.unwrap();
    assert_eq!(cache.lock().record_bytes, 0);
}
