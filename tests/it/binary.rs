//! The `hybridstore` binary itself: configuration from the environment,
//! refusal of an invalid one, and serving with the relay's variable names.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hybridstore_testkit::{ADMIN_TOKEN, create_database, etag_version, free_port, shared};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The binary with a clean environment, run from an empty directory (so no
/// config file is picked up).
fn hybridstore(dir: &std::path::Path, vars: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hybridstore"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir)
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
    command
}

fn run(vars: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let vars: Vec<(&str, String)> = vars.iter().map(|(k, v)| (*k, v.to_string())).collect();
    hybridstore(dir.path(), &vars)
        .output()
        .expect("run hybridstore")
}

#[test]
fn an_invalid_configuration_stops_the_start_and_names_the_key() {
    let valid = [
        ("ADMIN_TOKEN", ADMIN_TOKEN),
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none"),
        ("REDIS_URL", "redis://127.0.0.1:1"),
    ];
    let cases: [(&[(&str, &str)], &str); 10] = [
        (&[("PORT", "eighty")], "PORT"),
        // A named layer or tokens file that is not there stops the start
        // instead of starting without what it holds.
        (&[("HYBRIDSTORE_ENV", "prodd")], "config/prodd.toml"),
        (&[("TOKENS_FILE", "tokens.tmol")], "TOKENS_FILE"),
        // A scope on an undeclared collection (a typo) names its token.
        (
            &[(
                "HYBRIDSTORE_TOKENS",
                "[{name=\"relay\", token=\"relay-0123456789abcdef\", scopes=[\"write:apikeys\"]}]",
            )],
            "relay",
        ),
        (&[("DATABASE_STRATEGY", "fastest")], "DATABASE_STRATEGY"),
        (&[("REDIS_PORT", "-1")], "REDIS_PORT"),
        (&[("ADMIN_TOKEN", "")], "ADMIN_TOKEN"),
        (&[("HYBRIDSTORE_POSTGRES__POOL_SIZ", "4")], "pool_siz"),
        (&[("LOG_FORMAT", "xml")], "LOG_FORMAT"),
        (&[("LOG_RETENTION_DAYS", "0")], "LOG_RETENTION_DAYS"),
    ];
    for (overrides, key) in cases {
        let mut vars: Vec<(&str, &str)> = valid.to_vec();
        vars.retain(|(name, _)| !overrides.iter().any(|(o, _)| o == name));
        vars.extend_from_slice(overrides);
        let output = run(&vars);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{overrides:?}: {stderr}");
        assert!(
            stderr.contains("invalid configuration") && stderr.contains(key),
            "{overrides:?}: {stderr}"
        );
    }
    // Naming one server but not the other is a half-made production setup,
    // not embedded mode.
    let half = run(&[
        ("ADMIN_TOKEN", ADMIN_TOKEN),
        ("REDIS_URL", "redis://127.0.0.1:1"),
    ]);
    assert_eq!(half.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&half.stderr).contains("DATABASE_URL"));
}

/// Kills the server if a test fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_serves_with_the_relay_variable_names() {
    let servers = tokio::task::spawn_blocking(shared).await.unwrap();
    let database = create_database(&servers.postgres).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let vars = [
        ("LOG_DIR", logs.path().display().to_string()),
        ("LOG_FORMAT", "json".to_owned()),
        ("LOG_RETENTION_DAYS", "3".to_owned()),
        ("POSTGRES_HOST", "127.0.0.1".to_owned()),
        ("POSTGRES_PORT", servers.postgres.port().to_string()),
        ("POSTGRES_DATABASE", database.clone()),
        ("POSTGRES_USER", "postgres".to_owned()),
        ("REDIS_HOST", "127.0.0.1".to_owned()),
        ("REDIS_PORT", servers.redis.port().to_string()),
        (
            "HYBRIDSTORE_REDIS__KEY_PREFIX",
            format!("bin{}", std::process::id()),
        ),
        ("ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("PORT", port.to_string()),
        ("DATABASE_STRATEGY", "database_first".to_owned()),
    ];
    let child = hybridstore(dir.path(), &vars)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hybridstore");
    let mut server = Running(child);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let put = http
        .put(format!("{base}/v1/collections/users/records/u1"))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-request-id", "bin-req-1")
        .json(&json!({"username": "ada"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    assert_eq!(put.headers()["x-request-id"], "bin-req-1");
    let collections: Value = http
        .get(format!("{base}/v1/collections"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let users = collections["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "users")
        .unwrap();
    assert_eq!(
        users["effective_strategy"], "database_first",
        "DATABASE_STRATEGY applied"
    );

    let db = sqlx::PgPool::connect(&servers.postgres.url(&database))
        .await
        .unwrap();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM records WHERE collection = 'users' AND id = 'u1'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(stored, 1, "POSTGRES_* named the database");

    // SIGTERM: graceful stop, exit code 0.
    terminate(server.0.id());
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status:?}");

    // LOG_DIR: a daily file of JSON lines; the request's span carries its id
    // and route template, its end the status and latency.
    let files: Vec<_> = std::fs::read_dir(logs.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with("hybridstore.") && files[0].ends_with(".log"));
    let text = std::fs::read_to_string(logs.path().join(&files[0])).unwrap();
    let finished: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("JSON lines"))
        .filter(|line| line["span"]["request_id"] == "bin-req-1")
        .filter(|line| line["fields"]["status"] == 201)
        .collect();
    assert_eq!(finished.len(), 1, "{text}");
    assert_eq!(
        finished[0]["span"]["route"],
        "/v1/collections/{collection}/records/{id}"
    );
    assert!(finished[0]["fields"]["latency"].is_string());
}

fn terminate(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Entries waiting in the write-behind journal of a key prefix.
async fn write_behind_backlog(redis: &mut redis::aio::MultiplexedConnection, prefix: &str) -> u64 {
    let keys = hybridstore_redis::KeySpace::new(prefix);
    let mut total = 0;
    for stream in keys.journals(hybridstore_core::JournalKind::WriteBehind) {
        let length: u64 = redis::cmd("XLEN")
            .arg(stream)
            .query_async(redis)
            .await
            .unwrap();
        total += length;
    }
    total
}

async fn wait_for_health(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_killed_service_leaves_its_write_behind_backlog_to_the_next_one() {
    let postgres = std::sync::Arc::new(
        tokio::task::spawn_blocking(hybridstore_testkit::Postgres::start)
            .await
            .unwrap(),
    );
    let servers = tokio::task::spawn_blocking(shared).await.unwrap();
    let database = create_database(&postgres).await;
    let prefix = format!("kill{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let vars = |port: u16| {
        vec![
            ("DATABASE_URL", postgres.url(&database)),
            ("REDIS_URL", servers.redis.url()),
            ("HYBRIDSTORE_REDIS__KEY_PREFIX", prefix.clone()),
            (
                "HYBRIDSTORE_COLLECTIONS__HOT__STRATEGY",
                "cache_first".to_owned(),
            ),
            ("HYBRIDSTORE_POSTGRES__ACQUIRE_TIMEOUT_MS", "300".to_owned()),
            ("HYBRIDSTORE_POSTGRES__CALL_TIMEOUT_MS", "500".to_owned()),
            ("HYBRIDSTORE_JOURNAL__CLAIM_IDLE_MS", "1000".to_owned()),
            ("ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
            ("PORT", port.to_string()),
        ]
    };
    let http = reqwest::Client::new();
    let mut redis = redis::Client::open(servers.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // First service: PostgreSQL hangs, so writes pile up in the journal.
    let port = free_port();
    let first = hybridstore(dir.path(), &vars(port))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = Running(first);
    let base = format!("http://127.0.0.1:{port}");
    wait_for_health(&http, &base).await;
    let pg = postgres.clone();
    tokio::task::spawn_blocking(move || pg.pause())
        .await
        .unwrap();
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.len() < 50 {
        assert!(
            Instant::now() < deadline,
            "writes were not taken while PostgreSQL hung"
        );
        let id = format!("r{}", acked.len());
        let response = http
            .put(format!("{base}/v1/collections/hot/records/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"n": acked.len()}))
            .send()
            .await
            .unwrap();
        if response.status().is_success() {
            let version = etag_version(&response);
            acked.push((id, version));
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let backlog = write_behind_backlog(&mut redis, &prefix).await;
    assert!(
        backlog >= 50,
        "the backlog is in the journal: {backlog} entries"
    );

    // kill -9 the service itself, then let PostgreSQL go on.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let pg = postgres.clone();
    tokio::task::spawn_blocking(move || pg.resume())
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&postgres.url(&database))
        .await
        .unwrap();
    let in_postgres: i64 =
        sqlx::query_scalar("SELECT count(*) FROM records WHERE collection = 'hot'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(in_postgres, 0, "nothing was replayed before the kill");

    // A new service process replays what the killed one acknowledged.
    let port = free_port();
    let second = hybridstore(dir.path(), &vars(port))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _second = Running(second);
    let base = format!("http://127.0.0.1:{port}");
    wait_for_health(&http, &base).await;
    // Read-your-writes across the kill: the new process serves every
    // acknowledged version (from Redis, ahead of PostgreSQL).
    for (id, version) in &acked {
        let response = http
            .get(format!("{base}/v1/collections/hot/records/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        let read = etag_version(&response);
        assert!(
            read >= *version,
            "{id}: read v{read} after v{version} was acknowledged"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, version FROM records WHERE collection = 'hot' AND NOT deleted",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        let stored: std::collections::HashMap<String, i64> = rows.into_iter().collect();
        let all_there = acked
            .iter()
            .all(|(id, version)| stored.get(id) == Some(&(*version as i64)));
        if all_there && write_behind_backlog(&mut redis, &prefix).await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backlog did not reach PostgreSQL: {} of {} there",
            stored.len(),
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Record ids can be user names or emails: at the default log level they
/// never show in the log, also not in the WARN lines a request logs while a
/// tier fails under it (span fields included).
#[tokio::test]
async fn record_ids_stay_out_of_the_log_at_the_default_level() {
    use hybridstore_testkit::{Postgres, Redis, RedisPersistence, ServiceProcess, blocking};
    let postgres = blocking(Postgres::start).await;
    let redis = std::sync::Arc::new(blocking(|| Redis::start(RedisPersistence::None)).await);
    let database = create_database(&postgres).await;
    let env = vec![
        ("ADMIN_TOKEN".to_owned(), ADMIN_TOKEN.to_owned()),
        ("DATABASE_URL".to_owned(), postgres.url(&database)),
        ("REDIS_URL".to_owned(), redis.url()),
    ];
    let bin = env!("CARGO_BIN_EXE_hybridstore");
    let service = blocking(move || ServiceProcess::start(bin, env)).await;
    let http = reqwest::Client::new();
    let secret = "alice.secret@example.com";
    let url = service.url(&format!("/v1/collections/accounts/records/{secret}"));
    let put = |n: u32| {
        http.put(&url)
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"n": n}))
            .send()
    };
    assert_eq!(put(1).await.unwrap().status(), StatusCode::CREATED);
    // Redis dies under the next requests: the breaker opens inside them.
    let server = redis.clone();
    blocking(move || server.kill()).await;
    for n in 2..5 {
        assert!(put(n).await.unwrap().status().is_success());
    }
    let log = service.log();
    assert!(log.contains("WARN"), "a tier failure was logged:\n{log}");
    assert!(!log.contains(secret), "the record id is in the log:\n{log}");
}

/// `hybridstore token new` prints a strong token with its config entry; put
/// in a file named by TOKENS_FILE, it works at the next start with exactly
/// its scopes (read and write api_keys here, nothing else).
#[tokio::test]
async fn a_new_token_in_the_tokens_file_works_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let printed = hybridstore(dir.path(), &[])
        .args(["token", "new", "--name", "relay"])
        .args(["--scope", "read:api_keys", "--scope", "write:api_keys"])
        .output()
        .unwrap();
    assert!(printed.status.success());
    let entry = String::from_utf8(printed.stdout).unwrap();
    let token = entry
        .lines()
        .find_map(|line| line.strip_prefix("token = "))
        .expect("a token line")
        .trim_matches('"')
        .to_owned();
    assert_eq!(token.len(), 64, "256 bits as hex: {entry}");
    std::fs::write(dir.path().join("tokens.toml"), &entry).unwrap();
    let port = free_port();
    let server = hybridstore(
        dir.path(),
        &[
            ("PORT", port.to_string()),
            ("TOKENS_FILE", "tokens.toml".to_owned()),
            (
                "DATA_DIR",
                dir.path().join("data").to_string_lossy().into_owned(),
            ),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let _server = Running(server);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_for_health(&http, &base).await;
    let put = http
        .put(format!("{base}/v1/collections/api_keys/records/k1"))
        .bearer_auth(&token)
        .json(&json!({"key_hash": "h1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), reqwest::StatusCode::CREATED);
    let elsewhere = http
        .put(format!("{base}/v1/collections/accounts/records/a1"))
        .bearer_auth(&token)
        .json(&json!({"n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), reqwest::StatusCode::FORBIDDEN);
}
