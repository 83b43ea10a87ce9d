//! Faults under load: concurrent writers and readers run while a tier is
//! killed with SIGKILL and restarted. Afterwards every acknowledged write must
//! be in PostgreSQL, the journal empty, Redis and PostgreSQL in agreement; no
//! read may ever return a version older than one acknowledged before it
//! started; and after the breaker opened, at least 99% of requests succeed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hybridstore_testkit::{
    Postgres, Redis, RedisPersistence, TestApp, blocking, etag_version, shared,
};
use serde_json::{Value, json};

const WRITERS: usize = 4;
const KEYS_PER_WRITER: usize = 5;
const READERS: usize = 2;

/// What the load saw: the last acknowledged write of every key, and when
/// each request started and whether it succeeded.
#[derive(Default)]
struct Observed {
    acked: Mutex<HashMap<String, (u64, u64)>>,
    requests: Mutex<Vec<(Instant, bool, Duration)>>,
    breaker_opened: Mutex<Option<Instant>>,
}

impl Observed {
    fn floor(&self, key: &str) -> u64 {
        self.acked
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |(version, _)| *version)
    }

    fn record(&self, started: Instant, ok: bool) {
        self.requests
            .lock()
            .unwrap()
            .push((started, ok, started.elapsed()));
    }

    /// Success ratio of the requests that started in `[from, to)`.
    fn success_ratio(&self, from: Instant, to: Instant) -> (usize, f64) {
        let requests = self.requests.lock().unwrap();
        let window: Vec<bool> = requests
            .iter()
            .filter(|(at, _, _)| *at >= from && *at < to)
            .map(|(_, ok, _)| *ok)
            .collect();
        let ok = window.iter().filter(|ok| **ok).count();
        (window.len(), ok as f64 / window.len().max(1) as f64)
    }
}

fn key_name(writer: usize, key: usize) -> String {
    format!("w{writer}-k{key}")
}

/// Runs writers, readers and a breaker monitor until `stop` is set.
fn start_load(
    app: &Arc<TestApp>,
    observed: &Arc<Observed>,
    stop: &Arc<AtomicBool>,
    tier: &'static str,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (app, observed, stop) = (app.clone(), observed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for k in 0..KEYS_PER_WRITER {
                    seq += 1;
                    let key = key_name(writer, k);
                    let started = Instant::now();
                    let response = app
                        .put("accounts", &key, json!({"writer": writer, "seq": seq}))
                        .await;
                    let ok = response.status().is_success();
                    if ok {
                        let version = etag_version(&response);
                        let mut acked = observed.acked.lock().unwrap();
                        let previous = acked.insert(key.clone(), (version, seq));
                        assert!(
                            previous.is_none_or(|(v, _)| v < version),
                            "versions of {key} go up"
                        );
                    }
                    observed.record(started, ok);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    for reader in 0..READERS {
        let (app, observed, stop) = (app.clone(), observed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = reader;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let key = key_name(n % WRITERS, n % KEYS_PER_WRITER);
                let floor = observed.floor(&key);
                let started = Instant::now();
                let response = app.get("accounts", &key).await;
                let ok = response.status().is_success();
                if ok {
                    let version = etag_version(&response);
                    assert!(
                        version >= floor,
                        "read v{version} of {key} after v{floor} was acknowledged"
                    );
                }
                observed.record(started, ok);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }
    let (app, observed, stop) = (app.clone(), observed.clone(), stop.clone());
    tasks.push(tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            if let Ok(response) = app.http.get(app.url("/ready")).send().await {
                let body: Value = response.json().await.unwrap_or_default();
                let open = body["tiers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t["tier"] == tier && t["state"] != "closed");
                let mut opened = observed.breaker_opened.lock().unwrap();
                if open && opened.is_none() {
                    *opened = Some(Instant::now());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }));
    tasks
}

async fn prepare(app: &TestApp, observed: &Observed) {
    for writer in 0..WRITERS {
        for k in 0..KEYS_PER_WRITER {
            let key = key_name(writer, k);
            let response = app
                .put("accounts", &key, json!({"writer": writer, "seq": 0}))
                .await;
            assert!(response.status().is_success());
            observed
                .acked
                .lock()
                .unwrap()
                .insert(key, (etag_version(&response), 0));
        }
    }
}

/// Waits until the journal is empty and PostgreSQL has caught up.
async fn settle(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.journal_backlog().await > 0 {
        assert!(Instant::now() < deadline, "the journal did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every acknowledged write is in PostgreSQL with its version (or a later,
/// unacknowledged one), and Redis holds nothing PostgreSQL does not.
async fn assert_nothing_lost(app: &TestApp, observed: &Observed) {
    let acked = observed.acked.lock().unwrap().clone();
    assert_eq!(acked.len(), WRITERS * KEYS_PER_WRITER);
    for (key, (version, seq)) in acked {
        let stored = app
            .postgres_copy("accounts", &key)
            .await
            .unwrap_or_else(|| panic!("{key} missing in PostgreSQL"));
        assert!(
            stored.version >= version,
            "{key}: PostgreSQL has v{} < acknowledged v{version}",
            stored.version
        );
        if stored.version == version {
            assert_eq!(
                stored.data["seq"],
                json!(seq),
                "{key}: the acknowledged data"
            );
        }
        if let Some(cached) = app.redis_copy("accounts", &key).await {
            assert_eq!(cached, stored, "{key}: Redis and PostgreSQL agree");
        }
    }
}

/// Kills one tier mid-load and restarts it, then checks what the issue asks:
/// at least 99% of requests after its breaker opened succeeded, every
/// acknowledged write is in PostgreSQL, the journal is empty, the tiers agree
/// (and the readers checked read-your-writes throughout).
async fn single_tier_fault(
    app: Arc<TestApp>,
    tier: &'static str,
    kill: impl FnOnce() + Send + 'static,
    restart: impl FnOnce() + Send + 'static,
) {
    let observed = Arc::new(Observed::default());
    prepare(&app, &observed).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = start_load(&app, &observed, &stop, tier);
    tokio::time::sleep(Duration::from_millis(800)).await;
    blocking(kill).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarting = Instant::now();
    blocking(restart).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("a load task failed its checks");
    }

    let opened = observed
        .breaker_opened
        .lock()
        .unwrap()
        .unwrap_or_else(|| panic!("the {tier} breaker opened"));
    let (requests, ratio) = observed.success_ratio(opened, restarting);
    assert!(requests >= 100, "{requests} requests during the outage");
    assert!(
        ratio >= 0.99,
        "{:.2}% of {requests} requests succeeded during the outage",
        ratio * 100.0
    );
    let total = observed.requests.lock().unwrap().len();
    assert!(total >= 300, "{total} requests in all");

    settle(&app).await;
    assert_nothing_lost(&app, &observed).await;
}

#[tokio::test]
async fn postgres_killed_mid_load_loses_no_acknowledged_write() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = blocking(|| shared().redis.clone()).await;
    let app = TestApp::builder()
        .servers(postgres.clone(), redis)
        .spawn()
        .await;
    let (killed, restarted) = (postgres.clone(), postgres.clone());
    single_tier_fault(
        Arc::new(app),
        "durable",
        move || killed.kill(),
        move || restarted.restart(),
    )
    .await;
}

#[tokio::test]
async fn redis_killed_mid_load_and_restarted_from_its_file_serves_nothing_stale() {
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::AppendOnly)).await);
    let postgres = blocking(|| shared().postgres.clone()).await;
    let app = TestApp::builder()
        .servers(postgres, redis.clone())
        .spawn()
        .await;
    let (killed, restarted) = (redis.clone(), redis.clone());
    single_tier_fault(
        Arc::new(app),
        "cache",
        move || killed.kill(),
        move || restarted.restart(),
    )
    .await;
}

#[tokio::test]
async fn a_pending_outage_write_is_never_shadowed_by_the_older_postgres_copy() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::None)).await);
    let app = TestApp::builder()
        .servers(postgres.clone(), redis.clone())
        .spawn()
        .await;
    let v1 = etag_version(&app.put("accounts", "a", json!({"n": 1})).await);

    // PostgreSQL down: v2 is acknowledged from Redis and its outage journal.
    let pg = postgres.clone();
    blocking(move || pg.stop()).await;
    let mut v2 = None;
    for _ in 0..100 {
        let response = app.put("accounts", "a", json!({"n": 2})).await;
        if response.status().is_success() {
            v2 = Some(etag_version(&response));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v2 = v2.expect("the write was taken during the outage");
    assert!(v2 > v1);

    // Redis hangs before the journal is replayed, then PostgreSQL returns:
    // PostgreSQL holds v1, the truth (v2) is out of reach.
    let server = redis.clone();
    blocking(move || server.pause()).await;
    let pg = postgres.clone();
    blocking(move || pg.restart()).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let response = app.get("accounts", "a").await;
        if response.status().is_success() {
            assert!(
                etag_version(&response) >= v2,
                "served v1 while v2 waited in the journal"
            );
        } else {
            assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Redis back: the journal is replayed and v2 is everywhere.
    let server = redis.clone();
    blocking(move || server.resume()).await;
    settle(&app).await;
    let mut landed = false;
    for _ in 0..100 {
        if app.postgres_copy("accounts", "a").await.map(|c| c.version) == Some(v2) {
            landed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(landed, "the outage write reached PostgreSQL");
    assert_eq!(etag_version(&app.get("accounts", "a").await), v2);
}

#[tokio::test]
async fn both_tiers_down_under_load_answers_fast_503s_and_resumes_losing_nothing() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::AppendOnly)).await);
    let app = Arc::new(
        TestApp::builder()
            .servers(postgres.clone(), redis.clone())
            .spawn()
            .await,
    );
    let observed = Arc::new(Observed::default());
    prepare(&app, &observed).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tasks = start_load(&app, &observed, &stop, "cache");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (pg, server) = (postgres.clone(), redis.clone());
    blocking(move || {
        server.kill();
        pg.kill();
    })
    .await;
    // Both breakers open: /ready says nothing can serve.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = app
            .http
            .get(app.url("/ready"))
            .send()
            .await
            .unwrap()
            .status();
        if ready == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(Instant::now() < deadline, "both breakers did not open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let both_open = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarting = Instant::now();
    let (pg, server) = (postgres.clone(), redis.clone());
    blocking(move || {
        server.restart();
        pg.restart();
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("a load task failed its checks");
    }

    let requests = observed.requests.lock().unwrap().clone();
    let down: Vec<_> = requests
        .iter()
        .filter(|(at, _, _)| *at >= both_open && *at < restarting)
        .collect();
    assert!(
        down.len() >= 50,
        "{} requests while both were down",
        down.len()
    );
    for (_, ok, took) in &down {
        assert!(!ok, "nothing can succeed while both tiers are down");
        assert!(*took < Duration::from_millis(50), "a 503 took {took:?}");
    }
    let after: Vec<_> = requests
        .iter()
        .filter(|(at, _, _)| *at > restarting + Duration::from_secs(1))
        .collect();
    assert!(
        after.iter().any(|(_, ok, _)| *ok),
        "the service resumed without a restart"
    );

    settle(&app).await;
    assert_nothing_lost(&app, &observed).await;
}

/// A write the durable tier carried out but answered too late has an
/// unknown outcome, and the answer says so: `503 outcome_unknown` with
/// `Retry-After` (not `backends_unavailable`, which says no tier could
/// serve). The tier answered pings meanwhile: busy, not dead, so its
/// breaker stays closed. Retried with its Idempotency-Key (a 5xx is not
/// stored, so the retry runs), the write lands on the record it made.
#[tokio::test]
async fn a_write_answered_too_late_says_its_outcome_is_unknown() {
    let (builder, hooked) = TestApp::builder()
        .config("postgres.call_timeout_ms", 400)
        .hooked();
    let app = builder.spawn().await;
    let put = || {
        app.admin(
            reqwest::Method::PUT,
            "/v1/collections/accounts/records/late",
        )
        .header("idempotency-key", "write-late-1")
        .json(&json!({"n": 1}))
    };
    hooked.answer_puts_late(Duration::from_millis(1500));
    let answer = put().send().await.unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.headers().contains_key("retry-after"));
    let problem: Value = answer.json().await.unwrap();
    assert_eq!(problem["code"], "outcome_unknown", "{problem}");
    let taken = app.postgres_copy("accounts", "late").await;
    assert!(taken.is_some(), "the tier carried the write out");
    hooked.answer_puts_late(Duration::ZERO);
    let (_, status) = app
        .admin_call(reqwest::Method::GET, "/admin/database/status")
        .await;
    assert_eq!(
        status["tiers"]["durable"]["degradations"], 0,
        "a late answer alone does not open the breaker: {status}"
    );
    let retry = put().send().await.unwrap();
    assert_eq!(
        retry.status(),
        reqwest::StatusCode::OK,
        "it existed already"
    );
    let stored = app.postgres_copy("accounts", "late").await.unwrap();
    assert_eq!(stored.version, etag_version(&retry));
}
