//! The operator surface: `/admin/database/*` against real servers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridstore_testkit::{
    Deployment, Postgres, READER_TOKEN, TestApp, blocking, etag_version, shared, until,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const ADMIN_ROUTES: [(&str, &str); 10] = [
    ("GET", "/admin/database/health"),
    ("GET", "/admin/database/status"),
    ("GET", "/admin/database/metrics"),
    ("GET", "/admin/database/jobs"),
    ("GET", "/admin/database/jobs/x"),
    ("GET", "/admin/database/consistency-check"),
    ("POST", "/admin/database/consistency-check"),
    ("POST", "/admin/database/sync/redis-to-postgres"),
    ("POST", "/admin/database/sync/postgres-to-redis"),
    ("POST", "/admin/database/strategy/postgres-only"),
];

#[tokio::test]
async fn admin_endpoints_refuse_missing_and_client_tokens() {
    let app = TestApp::builder().spawn().await;
    for (method, path) in ADMIN_ROUTES {
        let method: Method = method.parse().unwrap();
        let anonymous = app
            .http
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED, "{path}");
        let problem: Value = anonymous.json().await.unwrap();
        assert_eq!(problem["code"], "unauthorized", "{path}");

        let client = app
            .http
            .request(method, app.url(path))
            .bearer_auth(READER_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(client.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(client.headers()["content-type"], "application/problem+json");
        let problem: Value = client.json().await.unwrap();
        assert_eq!(problem["code"], "forbidden", "{path}");
    }
    // The refused switch changed nothing, and no job was started.
    let (_, status) = app.admin_call(Method::GET, "/admin/database/status").await;
    assert_eq!(status["strategy"]["service"], "dual_write");
    assert!(status["strategy"]["switched"].is_null());
    let (_, jobs) = app.admin_call(Method::GET, "/admin/database/jobs").await;
    assert_eq!(jobs["jobs"], json!([]));
}

#[tokio::test]
async fn health_status_and_metrics_describe_the_service() {
    let app = TestApp::builder().spawn().await;
    app.put("accounts", "a", json!({"n": 1})).await;
    assert_eq!(app.get("accounts", "a").await.status(), StatusCode::OK);
    assert_eq!(
        app.get("accounts", "nope").await.status(),
        StatusCode::NOT_FOUND
    );

    let (status, health) = app.admin_call(Method::GET, "/admin/database/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "healthy");
    for tier in ["durable", "cache"] {
        assert_eq!(health["tiers"][tier]["state"], "closed", "{health}");
    }
    assert!(
        until(Duration::from_secs(2), || async {
            let (_, health) = app.admin_call(Method::GET, "/admin/database/health").await;
            health["tiers"]["durable"]["probe_latency_ms"].as_f64() > Some(0.0)
        })
        .await,
        "probe latency is reported"
    );

    let (_, report) = app.admin_call(Method::GET, "/admin/database/status").await;
    assert_eq!(report["strategy"]["configured"], "dual_write");
    assert_eq!(report["strategy"]["service"], "dual_write");
    assert_eq!(
        report["journal_backlog"],
        json!({"write_behind": 0, "outage": 0, "counters": 0, "dead_letters": 0})
    );
    assert_eq!(report["cache_generation"], 0);
    assert!(report["instance_id"].as_str().unwrap().starts_with("hs-"));
    assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
    let items = report["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "accounts")
        .unwrap();
    assert_eq!(items["effective"], "dual_write");

    let (_, metrics) = app.admin_call(Method::GET, "/admin/database/metrics").await;
    assert_eq!(metrics["operations"]["put"]["ok"], 1);
    assert_eq!(
        metrics["operations"]["get"]["ok"], 2,
        "a 404 read is served"
    );
    assert_eq!(metrics["requests"], 3);
    assert_eq!(metrics["error_rate"], 0.0);
    // The first read hit the copy the write left; the miss went to PostgreSQL.
    assert_eq!(metrics["cache_hits"], 1);
    assert_eq!(metrics["cache_misses"], 1);
    assert!(metrics["tiers"]["durable"]["calls"].as_u64().unwrap() >= 2);
    assert!(
        metrics["tiers"]["durable"]["latency"]["p99_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(metrics["degradations"], 0);
}

/// Status of `app` as JSON.
async fn status_of(app: &TestApp) -> Value {
    let (status, report) = app.admin_call(Method::GET, "/admin/database/status").await;
    assert_eq!(status, StatusCode::OK);
    report
}

#[tokio::test]
async fn a_switch_reaches_the_other_instance_within_a_second_and_survives_restarts() {
    let deployment = Deployment::new("switch").await;
    let spawn = || deployment.instance().spawn();
    let (a, b) = (spawn().await, spawn().await);
    a.put("accounts", "r", json!({"v": "before"})).await;
    assert_eq!(b.get("accounts", "r").await.status(), StatusCode::OK);

    let (status, outcome) = a
        .admin_call(Method::POST, "/admin/database/strategy/database-first")
        .await;
    assert_eq!(status, StatusCode::OK, "{outcome}");
    assert_eq!(outcome["previous"], "dual_write");
    assert_eq!(outcome["strategy"], "database_first");
    assert_eq!(outcome["changed"], true);
    let switched_at = Instant::now();
    let mut seen_after = None;
    while switched_at.elapsed() < Duration::from_secs(3) {
        if status_of(&b).await["strategy"]["service"] == "database_first" {
            seen_after = Some(switched_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen_after = seen_after.expect("instance B applies the switch");
    assert!(seen_after < Duration::from_secs(1), "took {seen_after:?}");

    // B really follows it: database_first reads PostgreSQL, not the copy.
    let version = a.postgres_copy("accounts", "r").await.unwrap().version;
    a.write_postgres_row("accounts", "r", version, json!({"v": "in postgres"}))
        .await;
    let read: Value = b.get("accounts", "r").await.json().await.unwrap();
    assert_eq!(read["data"]["v"], "in postgres");

    drop((a, b));
    let restarted = spawn().await;
    let report = status_of(&restarted).await;
    assert_eq!(report["strategy"]["configured"], "dual_write");
    assert_eq!(report["strategy"]["service"], "database_first");
    assert_eq!(report["strategy"]["switched"]["revision"], 1);
    let again = spawn().await;
    assert_eq!(
        status_of(&again).await["strategy"]["service"],
        "database_first"
    );
}

/// The collection `name` in a status report.
fn collection_of(report: &Value, name: &str) -> Value {
    report["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} in {report}"))
}

/// A switch of one collection: it alone changes, on every instance, over
/// service switches and restarts, until it is switched back.
#[tokio::test]
async fn a_collection_switch_applies_to_it_alone_everywhere_until_switched_back() {
    let deployment = Deployment::new("one").await;
    let spawn = || deployment.instance().spawn();
    let (a, b) = (spawn().await, spawn().await);
    let (status, outcome) = a
        .admin_call(
            Method::POST,
            "/admin/database/collections/accounts/strategy/postgres-only",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{outcome}");
    assert_eq!(
        (
            &outcome["previous"],
            &outcome["strategy"],
            &outcome["changed"]
        ),
        (&json!("dual_write"), &json!("postgres_only"), &json!(true))
    );
    assert_eq!(outcome["collections"], json!(["accounts"]));
    assert!(
        until(Duration::from_secs(2), || async {
            collection_of(&status_of(&b).await, "accounts")["strategy"] == "postgres_only"
        })
        .await,
        "B applies it"
    );
    let report = status_of(&b).await;
    let accounts = collection_of(&report, "accounts");
    assert_eq!(accounts["own_strategy"], true);
    assert!(
        accounts["note"]
            .as_str()
            .unwrap()
            .contains("by an operator")
    );
    assert_eq!(collection_of(&report, "groups")["strategy"], "dual_write");
    assert_eq!(report["strategy"]["service"], "dual_write");

    // B follows it: accounts skip the cache, groups do not.
    b.put("accounts", "p1", json!({"n": 1})).await;
    b.put("groups", "g1", json!({"n": 1})).await;
    assert!(b.redis_copy("accounts", "p1").await.is_none());
    assert!(b.redis_copy("groups", "g1").await.is_some());

    // A service switch leaves it alone.
    let (status, outcome) = a
        .admin_call(Method::POST, "/admin/database/strategy/database-first")
        .await;
    assert_eq!(status, StatusCode::OK, "{outcome}");
    assert!(
        !outcome["collections"]
            .as_array()
            .unwrap()
            .contains(&json!("accounts"))
    );
    let report = status_of(&a).await;
    assert_eq!(
        collection_of(&report, "accounts")["strategy"],
        "postgres_only"
    );
    assert_eq!(
        collection_of(&report, "groups")["strategy"],
        "database_first"
    );

    // Refused where the collection cannot take it.
    let (status, problem) = a
        .admin_call(
            Method::POST,
            "/admin/database/collections/api_keys/strategy/cache-first",
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(problem["code"], "not_allowed");

    // It survives a restart.
    drop((a, b));
    let restarted = spawn().await;
    let report = status_of(&restarted).await;
    assert_eq!(
        collection_of(&report, "accounts")["strategy"],
        "postgres_only"
    );
    // Back to what it follows: its copies may be stale, so every copy goes.
    restarted
        .write_redis_copy("accounts", "p1", 1, json!({"n": "stale"}))
        .await;
    let (status, outcome) = restarted
        .admin_call(
            Method::POST,
            "/admin/database/collections/accounts/strategy/service",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{outcome}");
    assert_eq!(outcome["strategy"], "database_first");
    assert_eq!(outcome["cache_flushed"], true);
    assert!(restarted.redis_copy("accounts", "p1").await.is_none());
    let read: Value = restarted.get("accounts", "p1").await.json().await.unwrap();
    assert_eq!(read["data"]["n"], 1);
    let report = status_of(&restarted).await;
    assert_eq!(collection_of(&report, "accounts")["own_strategy"], false);
}

#[tokio::test]
async fn switches_that_could_lose_data_need_force_or_are_refused() {
    // The default collections include unique indexes, which only the
    // durable tier enforces: a switch to write-behind applies to the rest,
    // and those stay on dual_write, saying why.
    let plain = TestApp::builder().spawn().await;
    let (status, outcome) = plain
        .admin_call(Method::POST, "/admin/database/strategy/cache_first")
        .await;
    assert_eq!(status, StatusCode::OK, "{outcome}");
    assert_eq!(
        outcome["held_back"],
        json!(["api_keys", "mcp_servers", "users"])
    );
    let report = status_of(&plain).await;
    let of = |name: &str| {
        report["collections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(of("accounts")["strategy"], "cache_first");
    assert_eq!(of("accounts")["note"], Value::Null);
    assert_eq!(of("api_keys")["strategy"], "dual_write");
    assert!(
        of("api_keys")["note"]
            .as_str()
            .unwrap()
            .contains("unique indexes"),
        "{report}"
    );
    // The relay's emergency step works with the shipped collections too.
    let (status, outcome) = plain
        .admin_call(
            Method::POST,
            "/admin/database/strategy/redis-only?force=true",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{outcome}");
    assert_eq!(outcome["strategy"], "redis_only");
    drop(plain);

    // A start with such a strategy configured serves the same way.
    let configured = TestApp::builder()
        .config("strategy", "cache_first")
        .spawn()
        .await;
    let report = status_of(&configured).await;
    let users = report["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "users")
        .cloned()
        .unwrap();
    assert_eq!(users["strategy"], "dual_write");
    let put = configured
        .put("users", "u1", json!({"username": "ada"}))
        .await;
    assert_eq!(put.status(), StatusCode::CREATED);
    drop(configured);

    // Those collections keep their own strategy; the rest follow switches.
    let app = TestApp::builder()
        .config("collections.api_keys.strategy", "dual_write")
        .config("collections.users.strategy", "dual_write")
        .config("collections.mcp_servers.strategy", "dual_write")
        .spawn()
        .await;
    let (status, problem) = app
        .admin_call(Method::POST, "/admin/database/strategy/redis-only")
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(problem["code"], "force_required");
    let (status, problem) = app
        .admin_call(Method::POST, "/admin/database/strategy/fastest")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["code"], "invalid_request");
    assert_eq!(status_of(&app).await["strategy"]["service"], "dual_write");

    // Leaving postgres_only drops every copy (writes skipped the cache).
    let (status, _) = app
        .admin_call(Method::POST, "/admin/database/strategy/postgres-only")
        .await;
    assert_eq!(status, StatusCode::OK);
    app.put("accounts", "x", json!({"n": 1})).await;
    app.write_redis_copy("accounts", "x", 1, json!({"n": "stale"}))
        .await;
    let (status, outcome) = app
        .admin_call(Method::POST, "/admin/database/strategy/dual-write")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(outcome["cache_flushed"], true);
    assert_eq!(status_of(&app).await["cache_generation"], 1);
    assert!(app.redis_copy("accounts", "x").await.is_none());
    let read: Value = app.get("accounts", "x").await.json().await.unwrap();
    assert_eq!(read["data"]["n"], 1);
}

/// The per-class counts of a check report, for one collection.
fn classes(report: &Value, collection: &str) -> Value {
    let found = report["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["collection"] == collection)
        .unwrap_or_else(|| panic!("{collection} in {report}"));
    let mut counts = serde_json::Map::new();
    for (class, found) in found["differences"].as_object().unwrap() {
        counts.insert(
            class.clone(),
            json!([found["count"], found["repaired"], found["sample_ids"]]),
        );
    }
    Value::Object(counts)
}

#[tokio::test]
async fn drift_is_found_in_its_class_and_repaired() {
    let app = TestApp::builder().spawn().await;
    for id in ["ahead", "mismatch", "stale", "fine"] {
        app.put("accounts", id, json!({"id": id})).await;
    }
    let version = |id: &'static str| {
        let app = &app;
        async move { app.postgres_copy("accounts", id).await.unwrap().version }
    };
    // Redis holds a newer version PostgreSQL never got.
    let ahead = version("ahead").await + 1000;
    app.write_redis_copy(
        "accounts",
        "ahead",
        ahead,
        json!({"id": "ahead", "new": true}),
    )
    .await;
    // A record only Redis holds.
    app.write_redis_copy("accounts", "orphan", 77, json!({"id": "orphan"}))
        .await;
    // PostgreSQL: a record Redis lacks, other content at the same version,
    // and a newer version than Redis's copy.
    app.write_postgres_row("accounts", "cold", 5, json!({"id": "cold"}))
        .await;
    let mismatch = version("mismatch").await;
    app.write_postgres_row("accounts", "mismatch", mismatch, json!({"id": "edited"}))
        .await;
    let stale = version("stale").await + 10;
    app.write_postgres_row(
        "accounts",
        "stale",
        stale,
        json!({"id": "stale", "newer": true}),
    )
    .await;

    let (status, report) = app
        .admin_call(Method::GET, "/admin/database/consistency-check")
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["consistent"], false);
    assert_eq!(
        classes(&report, "accounts"),
        json!({
            "missing_in_postgres": [1, 0, ["orphan"]],
            "redis_ahead": [1, 0, ["ahead"]],
            "redis_stale": [1, 0, ["stale"]],
            "content_mismatch": [1, 0, ["mismatch"]],
            "missing_in_redis": [1, 0, ["cold"]],
        })
    );
    assert_eq!(
        app.postgres_copy("accounts", "ahead").await.unwrap().data["new"],
        Value::Null,
        "a check without repair changes nothing"
    );

    let (_, repaired) = app
        .admin_call(Method::GET, "/admin/database/consistency-check?repair=true")
        .await;
    assert_eq!(repaired["consistent"], true, "{repaired}");
    assert_eq!(classes(&repaired, "accounts")["redis_ahead"][1], 1);

    let (_, again) = app
        .admin_call(Method::GET, "/admin/database/consistency-check")
        .await;
    assert_eq!(again["consistent"], true);
    assert_eq!(classes(&again, "accounts"), json!({}), "{again}");

    // The newer version won everywhere; at the same version, PostgreSQL.
    let pg = app.postgres_copy("accounts", "ahead").await.unwrap();
    assert_eq!((pg.version, pg.data["new"].clone()), (ahead, json!(true)));
    assert_eq!(
        app.postgres_copy("accounts", "orphan")
            .await
            .unwrap()
            .version,
        77
    );
    let copy = app.redis_copy("accounts", "stale").await.unwrap();
    assert_eq!(
        (copy.version, copy.data["newer"].clone()),
        (stale, json!(true))
    );
    assert_eq!(
        app.redis_copy("accounts", "mismatch").await.unwrap().data["id"],
        "edited"
    );
    assert_eq!(app.redis_copy("accounts", "cold").await.unwrap().version, 5);

    // The job form reports the same, with progress.
    let job = app
        .run_job("/admin/database/consistency-check?collection=accounts")
        .await;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["result"]["consistent"], true);
    assert_eq!(
        job["progress"]["scanned"], 6,
        "every PostgreSQL record: {job}"
    );
}

#[tokio::test]
async fn sync_after_a_postgres_outage_under_redis_only_brings_every_record_over() {
    let postgres = Arc::new(blocking(Postgres::start).await);
    let redis = blocking(|| shared().redis.clone()).await;
    let app = TestApp::builder()
        .servers(postgres.clone(), redis)
        .config("collections.items.strategy", "redis_only")
        .spawn()
        .await;
    for i in 0..10 {
        app.put("items", &format!("early{i}"), json!({"i": i}))
            .await;
    }
    let pg = postgres.clone();
    blocking(move || pg.kill()).await;
    assert!(app.wait_for_tier("durable", "open").await);
    let mut acked = Vec::new();
    for i in 0..40 {
        let id = format!("outage{i}");
        let response = app.put("items", &id, json!({"i": i})).await;
        assert_eq!(
            response.status(),
            StatusCode::CREATED,
            "redis_only serves alone"
        );
        acked.push((id, etag_version(&response)));
    }
    let deleted = app.delete("items", "early0").await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let pg = postgres.clone();
    blocking(move || pg.restart()).await;
    assert!(app.wait_for_tier("durable", "closed").await);

    // A copy PostgreSQL cannot store (jsonb refuses \u0000): counted as
    // failed, and the rest of its page still goes over.
    app.write_redis_copy("items", "poison", 5, json!({"s": "\u{0}"}))
        .await;

    let first = app.run_job("/admin/database/sync/redis-to-postgres").await;
    assert_eq!(first["state"], "succeeded", "{first}");
    assert_eq!(
        first["progress"]["written"], 50,
        "every record and the deletion: {first}"
    );
    assert!(first["progress"]["failed"].as_u64() >= Some(1), "{first}");
    for (id, version) in &acked {
        let row = app.postgres_copy("items", id).await.expect(id);
        assert_eq!(row.version, *version, "{id}");
    }
    assert!(
        !app.postgres_row("items", "early9").await.unwrap().1,
        "live"
    );
    assert!(
        app.postgres_row("items", "early0").await.unwrap().1,
        "deleted"
    );

    let second = app.run_job("/admin/database/sync/redis-to-postgres").await;
    assert_eq!(second["progress"]["written"], 0, "{second}");
    // (SCAN may return a key twice while Redis rehashes: hence no exact totals.)
    let count = |field: &str| second["progress"][field].as_u64().unwrap();
    assert!(count("skipped_older") >= 50, "{second}");
    assert_eq!(count("skipped_older") + count("failed"), count("scanned"));

    // PostgreSQL holds a newer version of one record: it stays without force.
    let newer = acked[0].1 + 100;
    app.write_postgres_row("items", "outage0", newer, json!({"from": "postgres"}))
        .await;
    let guarded = app
        .run_job("/admin/database/sync/redis-to-postgres?collection=items")
        .await;
    assert_eq!(guarded["progress"]["written"], 0);
    assert_eq!(
        app.postgres_copy("items", "outage0").await.unwrap().version,
        newer
    );
    let forced = app
        .run_job("/admin/database/sync/redis-to-postgres?collection=items&force=true")
        .await;
    assert!(forced["progress"]["written"].as_u64().unwrap() >= 1);
    let row = app.postgres_copy("items", "outage0").await.unwrap();
    assert_eq!((row.version, row.data["i"].clone()), (acked[0].1, json!(0)));
}

#[tokio::test]
async fn sync_postgres_to_redis_warms_the_cache_once() {
    let app = TestApp::builder().spawn().await;
    for i in 0..30 {
        app.write_postgres_row("accounts", &format!("r{i}"), 10 + i, json!({"i": i}))
            .await;
    }
    let job = app
        .run_job("/admin/database/sync/postgres-to-redis?collection=accounts")
        .await;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["progress"]["written"], 30, "{job}");
    assert_eq!(app.redis_copy("accounts", "r7").await.unwrap().version, 17);
    assert!(app.redis_pttl("accounts", "r7").await > 0, "a copy expires");
    let again = app
        .run_job("/admin/database/sync/postgres-to-redis?collection=accounts")
        .await;
    assert_eq!(again["progress"]["written"], 0);

    let (status, problem) = app
        .admin_call(
            Method::POST,
            "/admin/database/sync/postgres-to-redis?collection=Nope",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["code"], "invalid_name");
    let (status, problem) = app
        .admin_call(
            Method::POST,
            "/admin/database/sync/postgres-to-redis?colection=items",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    let (status, _) = app
        .admin_call(Method::GET, "/admin/database/jobs/no-such-job")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
