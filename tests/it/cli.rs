//! The `hybridstore` CLI end to end: the real binary against a running
//! service on real servers, checked by exit code and output.

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use hybridstore_testkit::{ADMIN_TOKEN, Redis, RedisPersistence, TestApp, blocking, shared, until};
use serde_json::{Value, json};

/// Runs `hybridstore args...` against `app` with the admin token.
async fn cli(app: &TestApp, args: &[&str]) -> Output {
    cli_with_token(app, ADMIN_TOKEN, args).await
}

async fn cli_with_token(app: &TestApp, token: &str, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hybridstore"));
    command
        .args(args)
        .env_remove("ADMIN_TOKEN")
        .env("HYBRIDSTORE_URL", app.url(""))
        .env("HYBRIDSTORE_ADMIN_TOKEN", token);
    blocking(move || command.output().expect("run the hybridstore binary")).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited")
}

#[tokio::test]
async fn the_cli_reports_switches_syncs_and_checks() {
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::None)).await);
    let postgres = blocking(|| shared().postgres.clone()).await;
    let app = TestApp::builder()
        .servers(postgres, redis.clone())
        .spawn()
        .await;

    let health = cli(&app, &["health", "--verbose"]).await;
    assert_eq!(code(&health), 0, "{}", stdout(&health));
    assert!(
        stdout(&health).starts_with("healthy"),
        "{}",
        stdout(&health)
    );

    let switched = cli(&app, &["switch-strategy", "database-first"]).await;
    assert_eq!(code(&switched), 0);
    assert!(stdout(&switched).contains("dual_write -> database_first"));
    let refused = cli(&app, &["switch-strategy", "redis-only"]).await;
    assert_eq!(code(&refused), 3, "a refused switch is an error");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("409"));
    let behind = cli(&app, &["switch-strategy", "cache-first"]).await;
    assert_eq!(code(&behind), 0, "{}", stdout(&behind));
    assert!(
        stdout(&behind).contains("kept on dual_write") && stdout(&behind).contains("api_keys"),
        "{}",
        stdout(&behind)
    );
    let status = cli(&app, &["status"]).await;
    assert!(
        stdout(&status).contains("unique indexes"),
        "{}",
        stdout(&status)
    );
    let back = cli(&app, &["switch-strategy", "database-first"]).await;
    assert_eq!(code(&back), 0, "{}", stdout(&back));
    let one = cli(
        &app,
        &["switch-strategy", "postgres-only", "--collection", "groups"],
    )
    .await;
    assert_eq!(code(&one), 0, "{}", stdout(&one));
    assert!(
        stdout(&one).contains("strategy of groups database_first -> postgres_only"),
        "{}",
        stdout(&one)
    );
    let back = cli(
        &app,
        &["switch-strategy", "service", "--collection", "groups"],
    )
    .await;
    assert_eq!(code(&back), 0, "{}", stdout(&back));
    assert!(
        stdout(&back).contains("-> database_first"),
        "{}",
        stdout(&back)
    );
    let status = cli(&app, &["status", "--json"]).await;
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["strategy"]["service"], "database_first");

    for i in 0..25 {
        app.write_postgres_row("accounts", &format!("a{i}"), 100 + i, json!({"i": i}))
            .await;
    }
    let sync = cli(
        &app,
        &[
            "sync",
            "--source",
            "postgres",
            "--target",
            "redis",
            "--collection",
            "accounts",
        ],
    )
    .await;
    assert_eq!(code(&sync), 0, "{}", stdout(&sync));
    assert!(
        stdout(&sync).contains("succeeded: scanned 25, written 25"),
        "{}",
        stdout(&sync)
    );
    assert_eq!(app.redis_copy("accounts", "a3").await.unwrap().version, 103);

    let check = cli(&app, &["check-consistency", "--json"]).await;
    assert_eq!(code(&check), 0, "{}", stdout(&check));
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(report["consistent"], true);

    app.write_redis_copy("accounts", "a4", 999, json!({"i": "ahead"}))
        .await;
    let check = cli(
        &app,
        &["check-consistency", "--json", "--collection", "accounts"],
    )
    .await;
    assert_eq!(code(&check), 1, "drift exits 1");
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    let accounts = &report["collections"][0];
    assert_eq!(
        accounts["differences"]["redis_ahead"]["sample_ids"],
        json!(["a4"])
    );
    let repaired = cli(&app, &["check-consistency", "--repair"]).await;
    assert_eq!(code(&repaired), 0, "{}", stdout(&repaired));
    assert_eq!(
        app.postgres_copy("accounts", "a4").await.unwrap().version,
        999
    );

    let metrics = cli(&app, &["metrics"]).await;
    assert_eq!(code(&metrics), 0);
    assert!(stdout(&metrics).contains("cache hit rate"));
    let usage = cli(&app, &["sync", "--source", "redis", "--target", "redis"]).await;
    assert_eq!(code(&usage), 2);
    let denied = cli_with_token(&app, "wrong-token-0123456789", &["status"]).await;
    assert_eq!(code(&denied), 3);

    let server = redis.clone();
    blocking(move || server.kill()).await;
    assert!(
        until(Duration::from_secs(10), || async {
            code(&cli(&app, &["health"]).await) == 1
        })
        .await,
        "a tier down exits 1"
    );
    let health = cli(&app, &["health", "--json"]).await;
    let health: Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(health["status"], "degraded");
    // Open, or half-open while a probe tries it.
    assert_ne!(health["tiers"]["cache"]["state"], "closed");
}

/// A server that cannot be reached is exit 3 with the reason the system
/// gave (connection refused), and a local file that cannot be read is exit
/// 1: 3 is kept for the server.
#[tokio::test]
async fn unreachable_servers_and_local_files_fail_with_their_own_codes_and_reasons() {
    let port = hybridstore_testkit::free_port();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hybridstore"));
    command
        .arg("status")
        .env_remove("ADMIN_TOKEN")
        .env("HYBRIDSTORE_URL", format!("http://127.0.0.1:{port}"))
        .env("HYBRIDSTORE_ADMIN_TOKEN", ADMIN_TOKEN);
    let refused = blocking(move || command.output().unwrap()).await;
    let said = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert_eq!(code(&refused), 3, "{said}");
    assert!(said.contains("connection refused"), "{said}");

    let app = TestApp::builder().embedded().spawn().await;
    // A 401 says which token was sent, or where none was found.
    let wrong = cli_with_token(&app, "not-the-admin-token-at-all", &["status"]).await;
    let said = String::from_utf8_lossy(&wrong.stderr).into_owned();
    assert_eq!(code(&wrong), 3, "{said}");
    assert!(
        said.contains("401") && said.contains("--admin-token"),
        "{said}"
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hybridstore"));
    command
        .arg("status")
        .current_dir(elsewhere.path())
        .env_remove("ADMIN_TOKEN")
        .env_remove("HYBRIDSTORE_ADMIN_TOKEN")
        .env_remove("DATA_DIR")
        .env("HYBRIDSTORE_URL", app.url(""));
    let none = blocking(move || command.output().unwrap()).await;
    let said = String::from_utf8_lossy(&none.stderr).into_owned();
    assert_eq!(code(&none), 3, "{said}");
    assert!(
        said.contains("no token") && said.contains("data/admin-token"),
        "{said}"
    );

    let missing = cli(&app, &["import", "/nonexistent/export.ndjson"]).await;
    assert_eq!(
        code(&missing),
        1,
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

/// `metrics --watch` into a pipe prints one report after the other, without
/// the clear-screen codes it uses on a terminal; `import -` reads standard
/// input (plain or gzipped).
#[tokio::test]
async fn watch_into_a_pipe_has_no_screen_codes_and_import_reads_standard_input() {
    let app = TestApp::builder().embedded().spawn().await;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hybridstore"));
    command
        .args(["metrics", "--watch", "--interval", "1"])
        .env_remove("ADMIN_TOKEN")
        .env("HYBRIDSTORE_URL", app.url(""))
        .env("HYBRIDSTORE_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(std::process::Stdio::piped());
    let mut watching = command.spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    watching.kill().unwrap();
    let watched = watching.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&watched.stdout);
    assert!(!printed.is_empty(), "it printed reports");
    assert!(!printed.contains('\x1b'), "no terminal codes: {printed:?}");

    assert!(
        app.put("accounts", "piped", json!({"n": 1}))
            .await
            .status()
            .is_success()
    );
    let export = cli(&app, &["export"]).await;
    assert_eq!(code(&export), 0);
    let other = TestApp::builder().embedded().spawn().await;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hybridstore"));
    command
        .args(["import", "-"])
        .env_remove("ADMIN_TOKEN")
        .env("HYBRIDSTORE_URL", other.url(""))
        .env("HYBRIDSTORE_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut importing = command.spawn().unwrap();
    {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(
            importing.stdin.take().unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(&export.stdout).unwrap();
        gz.finish().unwrap();
    }
    let imported = blocking(move || importing.wait_with_output().unwrap()).await;
    assert_eq!(
        code(&imported),
        0,
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    assert_eq!(other.get("accounts", "piped").await.status(), 200);
}

/// Over SQLite and the in-process cache, the CLI takes and prints the tiers
/// by their roles and their own names, never PostgreSQL or Redis.
#[tokio::test]
async fn embedded_tiers_are_named_by_their_roles_and_their_own_names() {
    let app = TestApp::builder().embedded().spawn().await;
    for id in ["a", "b", "c"] {
        assert_eq!(
            app.put("accounts", id, json!({"id": id})).await.status(),
            201
        );
    }
    app.drop_cached_copy("accounts", "b").await;
    let sync = cli(
        &app,
        &[
            "sync",
            "--source",
            "sqlite",
            "--target",
            "memory",
            "--collection",
            "accounts",
        ],
    )
    .await;
    assert_eq!(code(&sync), 0, "{}", stdout(&sync));
    assert!(app.cached_copy("accounts", "b").await.is_some());
    let by_role = cli(&app, &["sync", "--source", "durable", "--target", "cache"]).await;
    assert_eq!(code(&by_role), 0, "{}", stdout(&by_role));

    let check = cli(&app, &["check-consistency", "--collection", "accounts"]).await;
    let said = stdout(&check);
    assert_eq!(code(&check), 0, "{said}");
    assert!(
        said.contains("in the durable tier (sqlite)") && said.contains("in the cache (memory)"),
        "{said}"
    );

    app.simulate_outage(hybridstore_core::Tier::Cache, true);
    assert!(app.wait_for_tier("cache", "open").await);
    let status = cli(&app, &["status"]).await;
    let said = stdout(&status);
    assert!(said.contains("the cache (memory) is unavailable"), "{said}");
    assert!(
        !said.contains("PostgreSQL") && !said.contains("Redis"),
        "{said}"
    );
}

/// `serve` takes no client flags: its help offers none, and one is an error.
#[tokio::test]
async fn serve_help_offers_no_client_flags() {
    let help = blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hybridstore"))
            .args(["serve", "--help"])
            .output()
            .unwrap()
    })
    .await;
    assert_eq!(code(&help), 0);
    let said = stdout(&help);
    assert!(said.contains("Run the server"), "{said}");
    assert!(
        !said.contains("--admin-token") && !said.contains("--url") && !said.contains("--json"),
        "{said}"
    );
    let flagged = blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hybridstore"))
            .args(["serve", "--url", "http://x"])
            .output()
            .unwrap()
    })
    .await;
    assert_eq!(code(&flagged), 2);
}
