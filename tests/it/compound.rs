//! Faults in sequence: a tier failing while the other is still recovering,
//! replay held back while requests go on, concurrent writers during an
//! outage. Each test pins one guarantee that single outages never exercised.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridstore_core::{CollectionName, RecordId, RecordKey};
use hybridstore_testkit::{
    Deployment, HookedDurable, Postgres, Redis, RedisPersistence, TestApp, blocking,
    create_database, etag_version, shared, until,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn key(collection: &str, id: &str) -> RecordKey {
    RecordKey::new(
        CollectionName::parse(collection).unwrap(),
        RecordId::parse(id).unwrap(),
    )
}

/// Two instances of one deployment on servers of their own (Redis with an
/// append-only file), each with its durable calls hookable; and the Redis,
/// to kill.
async fn two_hooked_instances(
    name: &str,
    config: &[(&str, &str)],
) -> (Arc<Redis>, [(TestApp, Arc<HookedDurable>); 2]) {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::AppendOnly)).await);
    let database = create_database(&postgres).await;
    let prefix = format!("{name}{}", std::process::id());
    let spawn = || {
        let mut builder = TestApp::builder()
            .servers(postgres.clone(), redis.clone())
            .database(database.clone())
            .key_prefix(prefix.clone());
        for (key, value) in config {
            builder = builder.config(key, *value);
        }
        let (builder, hooked) = builder.hooked();
        async move { (builder.spawn().await, hooked) }
    };
    let instances = [spawn().await, spawn().await];
    (redis, instances)
}

async fn wait_tier(app: &TestApp, tier: &str, state: &str) {
    assert!(
        app.wait_for_tier(tier, state).await,
        "{tier} tier never became {state}"
    );
}

/// After PostgreSQL returns, replay of the outage journal is held back (its
/// batch waits on one record). Requests do not wait for it: writes commit in
/// PostgreSQL at once, on top of the journaled version of their key, and a
/// Redis outage in that window refuses only the keys whose newest version
/// is still in Redis alone.
#[tokio::test]
async fn requests_take_their_configured_path_while_replay_is_held_and_then_redis_dies() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::AppendOnly)).await);
    let (builder, hooked) = TestApp::builder().hooked();
    let app = builder
        .servers(postgres.clone(), redis.clone())
        .spawn()
        .await;
    for id in ["blocker", "j1", "j2"] {
        let created = app.put("accounts", id, json!({"n": 0})).await;
        assert_eq!(created.status(), StatusCode::CREATED);
    }

    let pg = postgres.clone();
    blocking(move || pg.kill()).await;
    wait_tier(&app, "durable", "open").await;
    let mut outage_versions = std::collections::HashMap::new();
    for id in ["blocker", "j1", "j2"] {
        let written = app.put("accounts", id, json!({"n": 1})).await;
        assert_eq!(
            written.status(),
            StatusCode::OK,
            "journaled during the outage"
        );
        outage_versions.insert(id, etag_version(&written));
    }

    // Replay will be stuck on the batch holding "blocker".
    hooked.hold_applies_of(key("accounts", "blocker"));
    let pg = postgres.clone();
    blocking(move || pg.restart()).await;
    wait_tier(&app, "durable", "closed").await;
    assert!(
        until(Duration::from_secs(10), || async {
            hooked.applies_held() > 0
        })
        .await,
        "replay reached the held batch"
    );

    // A patch merges onto the journaled version, not PostgreSQL's older one.
    let patched = app
        .admin(Method::PATCH, "/v1/collections/accounts/records/j1")
        .json(&json!({"m": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), StatusCode::OK);
    let patched_version = etag_version(&patched);
    assert!(patched_version > outage_versions["j1"]);
    let in_postgres = app.postgres_copy("accounts", "j1").await.unwrap();
    assert_eq!(
        (in_postgres.version, in_postgres.data),
        (patched_version, json!({"n": 1, "m": 1})),
        "committed in PostgreSQL before it was acknowledged, on top of the journaled version"
    );

    // A precondition is checked against the journaled version.
    let matched = app
        .admin(Method::PUT, "/v1/collections/accounts/records/j2")
        .header("if-match", format!("\"{}\"", outage_versions["j2"]))
        .json(&json!({"n": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(matched.status(), StatusCode::OK);
    assert_eq!(
        app.postgres_copy("accounts", "j2").await.map(|c| c.version),
        Some(etag_version(&matched))
    );

    // New records, also in a collection with a unique index.
    let fresh = app.put("accounts", "fresh", json!({"n": 1})).await;
    assert_eq!(fresh.status(), StatusCode::CREATED);
    assert_eq!(
        app.postgres_copy("accounts", "fresh")
            .await
            .map(|c| c.version),
        Some(etag_version(&fresh))
    );
    let api_key = app.put("api_keys", "k1", json!({"key_hash": "h1"})).await;
    assert_eq!(api_key.status(), StatusCode::CREATED);

    // Redis dies while "blocker" still waits to be replayed.
    let rd = redis.clone();
    blocking(move || rd.kill()).await;
    wait_tier(&app, "cache", "open").await;
    for id in ["fresh", "j1", "j2"] {
        let read = app.get("accounts", id).await;
        assert_eq!(read.status(), StatusCode::OK, "{id} is in PostgreSQL");
    }
    assert_eq!(
        app.lookup("api_keys", "key_hash", "h1").await.status(),
        StatusCode::OK
    );
    let created = app.put("accounts", "fresh2", json!({"n": 1})).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let held = app.get("accounts", "blocker").await;
    assert_eq!(
        held.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "its newest version is in Redis only: refused, never answered older"
    );
    let listed = app
        .admin(Method::GET, "/v1/collections/accounts/records")
        .send()
        .await
        .unwrap();
    assert_eq!(
        listed.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "a page that would show blocker's older state is refused"
    );
    let after_blocker = app
        .admin(
            Method::GET,
            "/v1/collections/accounts/records?after=blocker",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(after_blocker.status(), StatusCode::OK);

    // An unconditional write to it goes above the journaled version.
    let overwritten = app.put("accounts", "blocker", json!({"n": 9})).await;
    assert_eq!(overwritten.status(), StatusCode::OK);
    let overwritten = etag_version(&overwritten);
    assert!(overwritten > outage_versions["blocker"]);
    assert_eq!(
        etag_version(&app.get("accounts", "blocker").await),
        overwritten,
        "PostgreSQL now holds its newest version"
    );

    // Redis returns with its journal; the old entry finds itself superseded.
    hooked.release_applies();
    let rd = redis.clone();
    blocking(move || rd.restart()).await;
    wait_tier(&app, "cache", "closed").await;
    assert!(
        until(Duration::from_secs(10), || async {
            app.journal_backlog().await == 0
        })
        .await,
        "the journal drains"
    );
    let blocker = app.postgres_copy("accounts", "blocker").await.unwrap();
    assert_eq!(
        (blocker.version, blocker.data),
        (overwritten, json!({"n": 9}))
    );
    let read: Value = app.get("accounts", "blocker").await.json().await.unwrap();
    assert_eq!(read["version"], json!(overwritten));
}

/// During a PostgreSQL outage, writers race on the same records of a
/// collection with a unique index. None of them gave a precondition, so none
/// is answered 412.
#[tokio::test]
async fn racing_unconditional_writes_to_unique_indexed_records_never_get_412() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = blocking(|| shared().redis.clone()).await;
    let app = Arc::new(
        TestApp::builder()
            .servers(postgres.clone(), redis)
            .spawn()
            .await,
    );
    for n in 0..3 {
        let created = app
            .put(
                "api_keys",
                &format!("k{n}"),
                json!({"key_hash": format!("h{n}")}),
            )
            .await;
        assert_eq!(created.status(), StatusCode::CREATED);
    }
    let pg = postgres.clone();
    blocking(move || pg.kill()).await;
    wait_tier(&app, "durable", "open").await;

    let mut writers = Vec::new();
    for writer in 0..8 {
        let app = app.clone();
        writers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for round in 0..30 {
                let n = (writer + round) % 3;
                let body = json!({"key_hash": format!("h{n}"), "writer": writer, "round": round});
                statuses.push(app.put("api_keys", &format!("k{n}"), body).await.status());
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for writer in writers {
        statuses.extend(writer.await.unwrap());
    }
    let conflicts = statuses
        .iter()
        .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
        .count();
    let ok = statuses.iter().filter(|s| s.is_success()).count();
    assert_eq!(conflicts, 0, "412 without a precondition: {statuses:?}");
    assert_eq!(ok, statuses.len(), "every write was taken: {statuses:?}");
    let pg = postgres.clone();
    blocking(move || pg.restart()).await;
}

/// PostgreSQL killed under write load: the refused connection is noticed at
/// once, no request waits for the pool's timeout (the production default of
/// two seconds here), and writes go to the outage journal within a second.
#[tokio::test]
async fn a_killed_postgres_is_routed_around_within_a_second() {
    killed_postgres_is_routed_around("dual_write", false).await;
}

/// The same for cache_first, whose writes never wait for PostgreSQL, except
/// to learn whether a record it does not hold exists: creates of new records
/// (and reads of uncached ones) must not stall either, and from a second on
/// every write is taken.
#[tokio::test]
async fn cache_first_stays_available_when_postgres_is_killed() {
    killed_postgres_is_routed_around("cache_first", true).await;
}

async fn killed_postgres_is_routed_around(strategy: &str, new_records: bool) {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = blocking(|| shared().redis.clone()).await;
    let app = Arc::new(
        TestApp::builder()
            .servers(postgres.clone(), redis)
            .config("collections.accounts.strategy", strategy)
            .config("postgres.acquire_timeout_ms", 2000)
            .config("postgres.call_timeout_ms", 2000)
            .spawn()
            .await,
    );
    for n in 0..8 {
        app.put("accounts", &format!("a{n}"), json!({"n": 0})).await;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One writer: a busy pool would see its connections fail at once; a
    // quiet one finds them dead only when it needs a new one.
    let writer = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                let id = if new_records {
                    format!("new{round}")
                } else {
                    format!("a{}", round % 8)
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
                let status = app
                    .put("accounts", &id, json!({"round": round}))
                    .await
                    .status();
                seen.push((started, started.elapsed(), status));
                round += 1;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    let pg = postgres.clone();
    blocking(move || pg.kill()).await;
    assert!(
        until(Duration::from_secs(1), || async {
            let (_, health) = app.admin_call(Method::GET, "/admin/database/health").await;
            health["tiers"]["durable"]["state"] != "closed"
        })
        .await,
        "the breaker opened within a second of the kill"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let requests = writer.await.unwrap();
    let after: Vec<_> = requests.iter().filter(|(at, _, _)| *at >= killed).collect();
    let slowest = after.iter().map(|(_, took, _)| *took).max().unwrap();
    assert!(
        slowest < Duration::from_millis(1000),
        "a request waited {slowest:?} on the dead server"
    );
    let settled: Vec<_> = after
        .iter()
        .filter(|(at, _, _)| *at >= killed + Duration::from_secs(1))
        .collect();
    let ok = settled.iter().filter(|(_, _, s)| s.is_success()).count();
    assert!(!settled.is_empty());
    assert_eq!(ok, settled.len(), "from a second on, writes are journaled");
    let pg = postgres.clone();
    blocking(move || pg.restart()).await;
}

/// Redis comes back from a snapshot saved while a record was pinned by an
/// outage-journal entry; PostgreSQL has since received that version and a
/// newer one. The restored pinned copy, and the journal entry restored with
/// it, must not bring the older version back: no read returns it.
#[tokio::test]
async fn a_redis_restart_from_an_older_snapshot_serves_nothing_older_than_postgres() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::AppendOnly)).await);
    let app = TestApp::builder()
        .servers(postgres.clone(), redis.clone())
        .spawn()
        .await;
    assert_eq!(
        app.put("accounts", "s", json!({"n": 0})).await.status(),
        StatusCode::CREATED
    );
    let pg = postgres.clone();
    blocking(move || pg.kill()).await;
    wait_tier(&app, "durable", "open").await;
    let pinned = app.put("accounts", "s", json!({"n": 1})).await;
    assert_eq!(
        pinned.status(),
        StatusCode::OK,
        "journaled during the outage"
    );
    let pinned = etag_version(&pinned);
    let rd = redis.clone();
    blocking(move || rd.save()).await;

    let pg = postgres.clone();
    blocking(move || pg.restart()).await;
    assert!(
        until(Duration::from_secs(10), || async {
            app.journal_backlog().await == 0
                && app.postgres_copy("accounts", "s").await.map(|c| c.version) == Some(pinned)
        })
        .await,
        "the outage journal was replayed"
    );
    let newer = etag_version(&app.put("accounts", "s", json!({"n": 2})).await);
    assert!(newer > pinned);

    let rd = redis.clone();
    blocking(move || rd.restart_from_snapshot()).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while Instant::now() < deadline {
        let read = app.get("accounts", "s").await;
        if read.status() == StatusCode::OK {
            served += 1;
            assert!(
                etag_version(&read) >= newer,
                "a copy restored from the snapshot was served"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served > 0, "the record was served again after the restart");
    assert!(
        until(Duration::from_secs(10), || async {
            app.journal_backlog().await == 0
        })
        .await
    );
    assert_eq!(
        app.postgres_copy("accounts", "s").await.map(|c| c.version),
        Some(newer),
        "replaying the restored entry changed nothing"
    );
}

/// Write-behind entries of a cache_first collection wait (their replay is
/// held); other collections keep their own strategy: dual_write writes commit
/// in PostgreSQL, and creates in a unique-indexed collection succeed.
#[tokio::test]
async fn one_collections_write_behind_leaves_the_others_on_their_strategy() {
    let (builder, hooked) = TestApp::builder()
        .config("collections.groups.strategy", "cache_first")
        .hooked();
    let app = builder.spawn().await;
    hooked.hold_applies_of(key("groups", "g1"));
    let written = app.put("groups", "g1", json!({"n": 1})).await;
    assert_eq!(written.status(), StatusCode::CREATED);
    assert!(
        until(Duration::from_secs(10), || async {
            hooked.applies_held() > 0
        })
        .await,
        "replay reached the held batch"
    );

    let account = app.put("accounts", "a1", json!({"n": 1})).await;
    assert_eq!(account.status(), StatusCode::CREATED);
    assert_eq!(
        app.postgres_copy("accounts", "a1").await.map(|c| c.version),
        Some(etag_version(&account)),
        "dual_write commits in PostgreSQL before acknowledging"
    );
    let api_key = app.put("api_keys", "k1", json!({"key_hash": "h1"})).await;
    assert_eq!(api_key.status(), StatusCode::CREATED);
    assert!(app.postgres_copy("api_keys", "k1").await.is_some());

    hooked.release_applies();
    assert!(
        until(Duration::from_secs(10), || async {
            app.postgres_copy("groups", "g1").await.is_some()
        })
        .await
    );
}

/// A list is answered by PostgreSQL; journaled writes it does not hold yet
/// (replay held back here) show in it as they show in a read of their key.
#[tokio::test]
async fn a_list_shows_journaled_creates_and_deletes_before_replay() {
    let (builder, hooked) = TestApp::builder()
        .config("collections.groups.strategy", "cache_first")
        .config("collections.accounts.strategy", "cache_first")
        .hooked();
    let app = builder.spawn().await;
    let old = app.put("groups", "old", json!({"n": 0})).await;
    assert_eq!(old.status(), StatusCode::CREATED);
    assert!(
        until(Duration::from_secs(10), || async {
            app.postgres_copy("groups", "old").await.is_some()
        })
        .await
    );
    hooked.hold_applies_of(key("accounts", "blocker"));
    app.put("accounts", "blocker", json!({"n": 1})).await;
    assert!(
        until(Duration::from_secs(10), || async {
            hooked.applies_held() > 0
        })
        .await,
        "replay reached the held batch"
    );
    for id in ["new1", "new2", "zzz"] {
        let created = app.put("groups", id, json!({"n": 1})).await;
        assert_eq!(created.status(), StatusCode::CREATED);
    }
    assert_eq!(
        app.delete("groups", "old").await.status(),
        StatusCode::NO_CONTENT
    );
    assert!(
        app.postgres_copy("groups", "new1").await.is_none(),
        "replay is held: PostgreSQL does not have it yet"
    );

    let (ids, _) = app.list_page("groups", "").await;
    assert_eq!(ids, ["new1", "new2", "zzz"]);
    let (ids, next) = app.list_page("groups", "prefix=new&limit=1").await;
    assert_eq!(ids, ["new1"]);
    let next = next.as_str().expect("a next cursor").to_owned();
    let (ids, _) = app
        .list_page("groups", &format!("prefix=new&limit=1&after={next}"))
        .await;
    assert_eq!(ids, ["new2"]);
    hooked.release_applies();
}

/// What must be cleaned after writes went around the cache is known durably:
/// an instance that never lost Redis stops serving the copies another one
/// wrote around, and so does a new process started after the one that wrote
/// around it died. Here instance A cannot reach Redis (B can) while it
/// deletes an API key: B and A's successor must not authenticate it.
#[tokio::test]
async fn copies_written_around_are_never_served_by_another_instance_or_after_a_restart() {
    let deployment = Deployment::new("around").await;
    let spawn = || deployment.instance().spawn();
    let (a, b) = (spawn().await, spawn().await);
    for id in ["k1", "k2"] {
        let created = a
            .put("api_keys", id, json!({"key_hash": format!("hash-{id}")}))
            .await;
        assert_eq!(created.status(), StatusCode::CREATED);
        // Both instances have read it, so Redis holds the copy.
        assert_eq!(
            b.lookup("api_keys", "key_hash", &format!("hash-{id}"))
                .await
                .status(),
            StatusCode::OK
        );
    }

    // A loses Redis (B does not) and deletes k1 in PostgreSQL alone.
    a.simulate_outage(hybridstore_core::Tier::Cache, true);
    wait_tier(&a, "cache", "open").await;
    assert_eq!(
        a.delete("api_keys", "k1").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        a.get("api_keys", "k1").await.status(),
        StatusCode::NOT_FOUND
    );

    // B notices within a probe interval (250 ms) and stops serving the copy.
    assert!(
        until(Duration::from_secs(2), || async {
            b.get("api_keys", "k1").await.status() == StatusCode::NOT_FOUND
        })
        .await,
        "B stopped serving the deleted key"
    );
    assert_eq!(
        b.lookup("api_keys", "key_hash", "hash-k1").await.status(),
        StatusCode::NOT_FOUND,
        "the deleted key no longer authenticates through B"
    );
    assert_eq!(b.get("api_keys", "k2").await.status(), StatusCode::OK);

    // A deletes k2 too, then dies before Redis is back for it; its successor
    // (Redis reachable) must not serve the copy either.
    assert_eq!(
        a.delete("api_keys", "k2").await.status(),
        StatusCode::NO_CONTENT
    );
    drop(a);
    // B may have refilled k2 meanwhile; the successor's first look at the
    // generations decides.
    let successor = spawn().await;
    assert_eq!(
        successor.get("api_keys", "k2").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        successor
            .lookup("api_keys", "key_hash", "hash-k2")
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

/// A write around the cache just after another instance reconciled the
/// cache to this instance's previous bump is still made known: instance A
/// (cut off from Redis) deletes k1, B (probing every 10 ms) reconciles at
/// once and fills k2 again, and A deletes k2 well within 100 ms of its first
/// bump. A bump that started before that commit does not cover it: the
/// next instance to start must not serve k2. (Sharing one bump per 100 ms
/// let exactly this through.)
#[tokio::test]
async fn a_write_around_the_cache_right_after_another_reconciled_is_still_made_known() {
    let deployment = Deployment::new("again").await;
    let spawn = |probe_ms: u64| {
        deployment
            .instance()
            .config("health.probe_interval_ms", probe_ms)
            .spawn()
    };
    let (a, b) = (spawn(250).await, spawn(10).await);
    for id in ["k1", "k2"] {
        let created = a
            .put("api_keys", id, json!({"key_hash": format!("hash-{id}")}))
            .await;
        assert_eq!(created.status(), StatusCode::CREATED);
        assert_eq!(b.get("api_keys", id).await.status(), StatusCode::OK);
    }
    a.simulate_outage(hybridstore_core::Tier::Cache, true);
    wait_tier(&a, "cache", "open").await;
    let first_bump = std::time::Instant::now();
    assert_eq!(
        a.delete("api_keys", "k1").await.status(),
        StatusCode::NO_CONTENT
    );
    assert!(
        until(Duration::from_secs(2), || async {
            b.get("api_keys", "k1").await.status() == StatusCode::NOT_FOUND
        })
        .await
    );
    // B serves the cache again, and fills k2 into it.
    assert_eq!(b.get("api_keys", "k2").await.status(), StatusCode::OK);
    assert_eq!(
        a.delete("api_keys", "k2").await.status(),
        StatusCode::NO_CONTENT
    );
    let within = first_bump.elapsed();
    drop((a, b));
    let successor = spawn(250).await;
    assert_eq!(
        successor.get("api_keys", "k2").await.status(),
        StatusCode::NOT_FOUND,
        "k2 was deleted {within:?} after A's first bump"
    );
}

/// groups/g1's first version, written through `a` and replayed into
/// PostgreSQL; then every replay of g1 is held back on both instances.
async fn first_version_in_postgres_then_replay_held(
    a: &TestApp,
    hooked: [&Arc<HookedDurable>; 2],
) -> reqwest::Response {
    let first = a.put("groups", "g1", json!({"n": 1})).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(
        until(Duration::from_secs(10), || async {
            a.postgres_copy("groups", "g1").await.map(|c| c.version) == Some(etag_version(&first))
        })
        .await,
        "the first version reached PostgreSQL"
    );
    for hooked in hooked {
        hooked.hold_applies_of(key("groups", "g1"));
    }
    first
}

/// Two instances of one deployment: B journals a cache_first write (replay
/// is held back everywhere), then Redis dies. A never saw that write and
/// cannot read B's journal now; it must not serve PostgreSQL's older copy,
/// because B published the key to PostgreSQL. A write through A lands above
/// B's journaled version, and then A serves it.
#[tokio::test]
async fn another_instances_journaled_write_is_never_served_older_once_redis_dies() {
    let (redis, [(a, hooked_a), (b, hooked_b)]) =
        two_hooked_instances("held", &[("collections.groups.strategy", "cache_first")]).await;
    let first = first_version_in_postgres_then_replay_held(&a, [&hooked_a, &hooked_b]).await;
    let second = b.put("groups", "g1", json!({"n": 2})).await;
    assert_eq!(second.status(), StatusCode::OK);
    let journaled = etag_version(&second);
    assert!(
        until(Duration::from_secs(5), || async {
            let held: Option<i64> = sqlx::query_scalar(
                "SELECT version FROM held WHERE collection = 'groups' AND id = 'g1'",
            )
            .fetch_optional(&a.pg().db)
            .await
            .unwrap();
            held == Some(journaled as i64)
        })
        .await,
        "B published the journaled key within its publish interval"
    );

    let rd = redis.clone();
    blocking(move || rd.kill()).await;
    wait_tier(&a, "cache", "open").await;
    let read = a.get("groups", "g1").await;
    assert_eq!(
        read.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "not PostgreSQL's older version {}",
        etag_version(&first)
    );
    assert!(read.headers().contains_key("retry-after"));
    // Other keys are served as usual.
    let other = a.put("groups", "g2", json!({"n": 1})).await;
    assert_eq!(other.status(), StatusCode::CREATED);
    assert_eq!(a.get("groups", "g2").await.status(), StatusCode::OK);

    // An unconditional write through A goes above B's journaled version.
    let over = a.put("groups", "g1", json!({"n": 3})).await;
    assert_eq!(over.status(), StatusCode::OK);
    assert!(etag_version(&over) > journaled);
    let served = a.get("groups", "g1").await;
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(etag_version(&served), etag_version(&over));
}

/// The same, with Redis dying right after B acknowledged, before B's
/// publisher ran (its publishing also takes 60 ms here). A reads at once
/// after its breaker opened: it must not serve PostgreSQL's older version.
/// It waits until every instance's publisher has run once since it lost
/// Redis, and then finds B's key in the held list. (A campaign, seed 197
/// with two instances, read the older version 50 ms after Redis died.)
#[tokio::test]
async fn a_key_journaled_just_before_redis_died_is_not_served_older_by_another_instance() {
    let (redis, [(a, hooked_a), (b, hooked_b)]) =
        two_hooked_instances("grace", &[("collections.groups.strategy", "cache_first")]).await;
    let first = first_version_in_postgres_then_replay_held(&a, [&hooked_a, &hooked_b]).await;
    hooked_b.delay_holds(Duration::from_millis(60));

    let second = b.put("groups", "g1", json!({"n": 2})).await;
    assert_eq!(second.status(), StatusCode::OK);
    let rd = redis.clone();
    blocking(move || rd.kill()).await;
    // A's first call to the dead Redis opens its breaker (a cache_first
    // read that fails there answers 503); the reads after it go to
    // PostgreSQL, and none may answer its older version.
    for attempt in 0..5 {
        let read = a.get("groups", "g1").await;
        assert!(
            read.status() == StatusCode::SERVICE_UNAVAILABLE
                || etag_version(&read) >= etag_version(&second),
            "attempt {attempt}: {} with PostgreSQL's older version {}",
            read.status(),
            etag_version(&first)
        );
    }
    for hooked in [&hooked_a, &hooked_b] {
        hooked.release_applies();
    }
}

/// Two instances: PostgreSQL is back, but B has not seen it yet (its
/// breaker is still open: here a simulated outage keeps it so, while
/// PostgreSQL serves A). B journals a write in the outage journal, replay
/// is held back, and Redis dies before B's next publish could run (the
/// publisher needs B's breaker closed). A must not serve PostgreSQL's older
/// version: B published the key to PostgreSQL's held list past its open
/// breaker before it acknowledged the write. (A campaign, seed 82 with two
/// instances, read older versions this way, 50 to 300 ms after Redis died.)
#[tokio::test]
async fn a_write_journaled_before_its_instance_saw_postgres_return_is_never_served_older() {
    let (redis, [(a, hooked_a), (b, hooked_b)]) = two_hooked_instances("late", &[]).await;
    let first = a.put("accounts", "h6", json!({"n": 1})).await;
    assert_eq!(first.status(), StatusCode::CREATED);

    b.simulate_outage(hybridstore_core::Tier::Durable, true);
    wait_tier(&b, "durable", "open").await;
    for hooked in [&hooked_a, &hooked_b] {
        hooked.hold_applies_of(key("accounts", "h6"));
    }
    let second = b.put("accounts", "h6", json!({"n": 2})).await;
    assert_eq!(second.status(), StatusCode::OK);
    let journaled = etag_version(&second);
    // Published before the answer, not by the publisher (100 ms, and only
    // with B's breaker closed).
    let held: Option<i64> =
        sqlx::query_scalar("SELECT version FROM held WHERE collection = 'accounts' AND id = 'h6'")
            .fetch_optional(&a.pg().db)
            .await
            .unwrap();
    assert_eq!(held, Some(journaled as i64), "held before B answered");

    let rd = redis.clone();
    blocking(move || rd.kill()).await;
    wait_tier(&a, "cache", "open").await;
    let read = a.get("accounts", "h6").await;
    assert_eq!(
        read.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "not PostgreSQL's older version {}",
        etag_version(&first)
    );
    b.simulate_outage(hybridstore_core::Tier::Durable, false);
}
