//! Export, import, backups and the embedded server's durability, through the
//! real `hybridstore` binary (CLI and server).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridstore_testkit::{ADMIN_TOKEN, TestApp, blocking, etag_version, free_port, until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug)]
enum Mode {
    Production,
    Embedded,
    /// Redis alone (`POSTGRES_ENABLED=false`).
    CacheOnly,
}

async fn spawn(mode: Mode) -> TestApp {
    match mode {
        Mode::Production => TestApp::builder().spawn().await,
        Mode::Embedded => TestApp::builder().embedded().spawn().await,
        Mode::CacheOnly => {
            TestApp::builder()
                .config("postgres.enabled", false)
                .spawn()
                .await
        }
    }
}

/// The CLI against `app`.
async fn cli(app: &TestApp, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hybridstore"));
    command
        .args(args)
        .env_remove("ADMIN_TOKEN")
        .env("HYBRIDSTORE_URL", app.url(""))
        .env("HYBRIDSTORE_ADMIN_TOKEN", ADMIN_TOKEN);
    blocking(move || command.output().expect("run the hybridstore binary")).await
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A data set touching every kind of line: records in several collections
/// (one with a unique index), a deletion, exact fractional counters.
async fn write_data_set(app: &TestApp) {
    for n in 0..30 {
        let response = app
            .put(
                "accounts",
                &format!("acct:{n:02}"),
                json!({"n": n, "tags": ["a", n]}),
            )
            .await;
        assert!(response.status().is_success());
    }
    for name in ["ada", "grace", "linus"] {
        app.put("users", name, json!({"username": name})).await;
    }
    app.put("users", "ada", json!({"username": "ada", "admin": true}))
        .await;
    app.delete("accounts", "acct:07").await;
    // The extremes of what the API accepts: the deepest nesting, text beyond
    // the Basic Multilingual Plane and line separators, a record near the
    // body limit.
    let mut deep = json!({"bottom": true});
    for _ in 1..hybridstore_core::MAX_DATA_DEPTH {
        deep = json!({ "d": deep });
    }
    let text = "naïve 日本語 🎉 \u{2028} \u{2029} \"quoted\" \\ tab\t end";
    let big = "x".repeat(1_000_000);
    for (id, data) in [
        ("deep", deep),
        ("unicode", json!({"text": text, "ключ": text})),
        ("big", json!({"big": big})),
    ] {
        let response = app.put("accounts", id, data).await;
        assert!(
            response.status().is_success(),
            "{id}: {}",
            response.status()
        );
    }
    for n in 0..5 {
        let deltas = json!({"deltas": {"requests": 1, "cost_usd": 0.013, "tokens": 1000 + n}});
        assert_eq!(
            app.increment("usage:key_1:model:sonnet", deltas)
                .await
                .status(),
            StatusCode::OK
        );
    }
    app.increment("usage:key_2", json!({"deltas": {"requests": 2}}))
        .await;
    // The largest totals the arithmetic allows, both ways: a thousand of
    // the largest delta make exactly +10^18 and -10^18, beside a fraction
    // in the last decimal.
    for _ in 0..50 {
        let batch = (0..20).map(|_| {
            app.increment(
                "usage:big",
                json!({"deltas": {
                    "tokens": 1_000_000_000_000_000_i64,
                    "debt": -1_000_000_000_000_000_i64,
                    "cost_usd": 0.000000001,
                }}),
            )
        });
        for response in futures_util::future::join_all(batch).await {
            assert_eq!(response.status(), StatusCode::OK);
        }
    }
    // Increments written behind (cache_first) must reach the durable tier first.
    assert!(
        until(Duration::from_secs(10), || async {
            let (_, status) = app.admin_call(Method::GET, "/admin/database/status").await;
            status["journal_backlog"]["counters"] == 0 && status["journal_backlog"]["outage"] == 0
        })
        .await
    );
}

/// An export's lines in an order that does not depend on the tier: a
/// cache-only deployment walks its counter buckets in the cache's own order
/// (like Redis `SCAN`, one may come twice).
fn in_order(mode: Mode, mut lines: Vec<Value>) -> Vec<Value> {
    if matches!(mode, Mode::CacheOnly) {
        lines.sort_by_key(|line| line.to_string());
        lines.dedup();
    }
    lines
}

/// Everything the durable tier holds, as export lines without the header
/// (which names the instance and time).
async fn exported(app: &TestApp) -> Vec<Value> {
    app.export_lines().await.split_off(1)
}

fn backup_files(dir: &Path) -> (PathBuf, PathBuf) {
    let mut manifest = None;
    let mut data = None;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".manifest.json") {
            manifest = Some(path);
        } else if name.ends_with(".ndjson.gz") {
            data = Some(path);
        }
    }
    (manifest.expect("a manifest"), data.expect("a data file"))
}

/// A broken copy of a backup (both files, with `damage` done to the data).
fn broken_copy(
    manifest: &Path,
    data: &Path,
    damage: impl Fn(&mut Vec<u8>),
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(manifest.file_name().unwrap());
    std::fs::copy(manifest, &copy).unwrap();
    let mut bytes = std::fs::read(data).unwrap();
    damage(&mut bytes);
    std::fs::write(dir.path().join(data.file_name().unwrap()), bytes).unwrap();
    (dir, copy)
}

async fn restore_drill(mode: Mode) {
    let source = spawn(mode).await;
    write_data_set(&source).await;
    let original = in_order(mode, exported(&source).await);
    for (field, total) in [
        ("tokens", "1000000000000000000"),
        ("debt", "-1000000000000000000"),
    ] {
        assert!(
            original.iter().any(|line| line["type"] == "counter"
                && line["scope"] == "usage:big"
                && line["granularity"] == "total"
                && line["field"] == field
                && line["value"] == total),
            "the export carries the {field} total {total}"
        );
    }
    assert_eq!(
        exported(&source).await.last().unwrap()["type"],
        "end",
        "the end line comes last"
    );

    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path().to_str().unwrap();
    let created = cli(&source, &["backup", "create", "--dir", dir, "--keep", "3"]).await;
    assert!(created.status.success(), "{}", text(&created));
    let (manifest, data) = backup_files(backups.path());
    let verified = cli(&source, &["backup", "verify", manifest.to_str().unwrap()]).await;
    assert!(verified.status.success(), "{}", text(&verified));
    // --json: the report as JSON, as every other subcommand.
    let as_json = cli(
        &source,
        &["--json", "backup", "verify", manifest.to_str().unwrap()],
    )
    .await;
    let report: Value = serde_json::from_slice(&as_json.stdout)
        .unwrap_or_else(|err| panic!("verify --json printed no JSON ({err}): {}", text(&as_json)));
    assert_eq!(report["ok"], true, "{report}");
    let stated: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(stated["records"]["accounts"], 32);
    assert_eq!(stated["records"]["users"], 3);
    // A deleted record of a collection the cache holds is simply gone (its
    // marker is not kept past the reads it guards): nothing to carry.
    let deletions = if matches!(mode, Mode::CacheOnly) {
        0
    } else {
        1
    };
    assert_eq!(stated["deletions"], deletions);

    // Wiped stores: a new, empty database and cache (or data directory).
    let target = spawn(mode).await;
    assert_eq!(exported(&target).await.len(), 1, "empty: only the end line");

    let flipped = broken_copy(&manifest, &data, |bytes| {
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
    });
    let truncated = broken_copy(&manifest, &data, |bytes| {
        bytes.truncate(bytes.len() * 2 / 3)
    });
    for (broken, what) in [(&flipped.1, "corrupted"), (&truncated.1, "truncated")] {
        let path = broken.to_str().unwrap();
        let verify = cli(&target, &["backup", "verify", path]).await;
        assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));
        assert!(text(&verify).contains(what), "{}", text(&verify));
        let restore = cli(&target, &["backup", "restore", path]).await;
        assert_eq!(restore.status.code(), Some(1), "{}", text(&restore));
        assert!(
            text(&restore).contains("not restoring"),
            "{}",
            text(&restore)
        );
        assert_eq!(
            exported(&target).await.len(),
            1,
            "a bad backup changes nothing"
        );
    }

    let restored = cli(&target, &["backup", "restore", manifest.to_str().unwrap()]).await;
    assert!(restored.status.success(), "{}", text(&restored));
    assert_eq!(
        in_order(mode, exported(&target).await),
        original,
        "every record, deletion and counter"
    );
    // Served as before: data, versions, unique index, counters.
    for n in [0, 13, 29] {
        let id = format!("acct:{n:02}");
        let before: Value = source.get("accounts", &id).await.json().await.unwrap();
        let after: Value = target.get("accounts", &id).await.json().await.unwrap();
        assert_eq!(before, after);
    }
    assert_eq!(
        target.get("accounts", "acct:07").await.status(),
        StatusCode::NOT_FOUND
    );
    let ada: Value = target
        .lookup("users", "username", "ada")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ada["data"], json!({"username": "ada", "admin": true}));
    for query in ["granularity=total", "granularity=hour", "granularity=day"] {
        assert_eq!(
            source
                .read_counters("usage:key_1:model:sonnet", query)
                .await,
            target
                .read_counters("usage:key_1:model:sonnet", query)
                .await,
            "{query}"
        );
    }
    let totals = target
        .read_counters("usage:key_1:model:sonnet", "granularity=total")
        .await;
    assert_eq!(totals["buckets"][0]["values"]["cost_usd"], json!(0.065));

    // Restoring again changes nothing.
    let again = cli(
        &target,
        &["--json", "backup", "restore", manifest.to_str().unwrap()],
    )
    .await;
    assert!(again.status.success(), "{}", text(&again));
    let report: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["report"]["applied"], json!({}), "{report}");
    assert_eq!(report["report"]["counters_applied"], 0, "{report}");
}

#[tokio::test]
async fn restore_drill_in_production_mode() {
    restore_drill(Mode::Production).await;
}

/// A cache-only deployment backs up what Redis holds, records and
/// counters, and restores it into an empty one.
#[tokio::test]
async fn restore_drill_in_a_cache_only_deployment() {
    restore_drill(Mode::CacheOnly).await;
}

#[tokio::test]
async fn restore_drill_in_embedded_mode() {
    restore_drill(Mode::Embedded).await;
}

#[tokio::test]
async fn embedded_data_moves_to_production_and_checks_clean() {
    let embedded = spawn(Mode::Embedded).await;
    write_data_set(&embedded).await;
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("export.ndjson.gz");
    let file = file.to_str().unwrap();
    let exported_file = cli(&embedded, &["export", "--output", file]).await;
    assert!(exported_file.status.success(), "{}", text(&exported_file));
    // What it holds, not its lines (a header and an end line are no data).
    assert!(
        text(&exported_file).contains("exported 35 records, 1 deletions,"),
        "{}",
        text(&exported_file)
    );

    let production = spawn(Mode::Production).await;
    let imported = cli(&production, &["import", file]).await;
    assert!(imported.status.success(), "{}", text(&imported));
    assert_eq!(exported(&production).await, exported(&embedded).await);
    let (status, report) = production
        .admin_call(Method::GET, "/admin/database/consistency-check")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["consistent"], json!(true), "{report}");
    let ada: Value = production
        .lookup("users", "username", "ada")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ada["id"], "ada");

    // Version-guarded: a newer write survives a second import; --force wins.
    let newer = etag_version(
        &production
            .put("accounts", "acct:01", json!({"n": "newer"}))
            .await,
    );
    let again = cli(&production, &["import", file]).await;
    assert!(again.status.success(), "{}", text(&again));
    let kept: Value = production
        .get("accounts", "acct:01")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(kept["version"], json!(newer));
    let forced = cli(&production, &["import", "--force", file]).await;
    assert!(forced.status.success(), "{}", text(&forced));
    let back: Value = production
        .get("accounts", "acct:01")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(back["data"], json!({"n": 1, "tags": ["a", 1]}));

    // A malformed file is refused before anything is sent.
    let bad = files.path().join("bad.ndjson");
    std::fs::write(&bad, "{\"type\":\"header\"}\nnot json\n").unwrap();
    let refused = cli(&production, &["import", bad.to_str().unwrap()]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
}

#[tokio::test]
async fn the_server_refuses_an_import_it_cannot_fully_read_and_writes_nothing() {
    let app = spawn(Mode::Embedded).await;
    let header = r#"{"type":"header","format":"hybridstore-export","version":1,"source":{"backend":"sqlite","instance":"x","service_version":"0"},"created_at":"2026-11-22T00:00:00Z"}"#;
    let record = r#"{"type":"record","collection":"accounts","id":"a","version":5,"data":{},"created_at":"2026-11-22T00:00:00Z","updated_at":"2026-11-22T00:00:00Z"}"#;
    let unknown = r#"{"type":"record","collection":"nope","id":"a","version":5,"data":{},"created_at":"2026-11-22T00:00:00Z","updated_at":"2026-11-22T00:00:00Z"}"#;
    let end = r#"{"type":"end","records":{"accounts":1},"deletions":0,"counters":0}"#;
    for body in [
        format!("{header}\n{record}\n"),
        format!("{header}\n{record}\n{unknown}\n{end}\n"),
        format!("{header}\n{record}\n{{broken\n{end}\n"),
    ] {
        let response = app
            .admin(Method::POST, "/admin/database/import")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_request", "{problem}");
        assert_eq!(
            app.get("accounts", "a").await.status(),
            StatusCode::NOT_FOUND
        );
    }
    let good = app
        .admin(Method::POST, "/admin/database/import")
        .body(format!("{header}\n{record}\n{end}\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), StatusCode::OK);
    assert_eq!(app.get("accounts", "a").await.status(), StatusCode::OK);
}

/// Kills the server if a test fails before it does.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_embedded(dir: &Path, port: u16) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_hybridstore"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", port.to_string())
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("LOG_LEVEL", "warn")
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the embedded server");
    Running(child)
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(response) = http.get(format!("{base}/ready")).send().await
            && response.status() == StatusCode::OK
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the embedded server did not become ready");
}

#[tokio::test]
async fn kill_9_of_the_embedded_server_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut server = start_embedded(dir.path(), port);
    wait_ready(&http, &base).await;

    // Four writers update their own records and count increments until the kill.
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    let increments = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writers = Vec::new();
    for writer in 0..4 {
        let (http, base) = (http.clone(), base.clone());
        let (acknowledged, increments, sent) =
            (acknowledged.clone(), increments.clone(), sent.clone());
        writers.push(tokio::spawn(async move {
            for n in 0u64.. {
                let id = format!("w{writer}-{}", n % 25);
                let put = http
                    .put(format!("{base}/v1/collections/accounts/records/{id}"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({"writer": writer, "n": n}))
                    .send()
                    .await;
                match put {
                    Ok(response) if response.status().is_success() => {
                        let version = etag_version(&response);
                        acknowledged.lock().unwrap().push((id, version));
                    }
                    _ => return,
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let increment = http
                    .post(format!("{base}/v1/counters/usage:crash/increment"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({"deltas": {"requests": 1}}))
                    .send()
                    .await;
                match increment {
                    Ok(response) if response.status().is_success() => {
                        increments.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SIGKILL: no shutdown, no flush.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 50,
        "only {} writes before the kill",
        acknowledged.len()
    );

    let _restarted = start_embedded(dir.path(), port);
    wait_ready(&http, &base).await;
    let mut newest: std::collections::HashMap<String, u64> = Default::default();
    for (id, version) in acknowledged {
        let entry = newest.entry(id).or_default();
        *entry = (*entry).max(version);
    }
    for (id, version) in &newest {
        let response = http
            .get(format!("{base}/v1/collections/accounts/records/{id}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{id} is gone");
        assert!(
            etag_version(&response) >= *version,
            "{id} lost version {version}"
        );
    }
    let counted: Value = http
        .get(format!("{base}/v1/counters/usage:crash?granularity=total"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let total = counted["buckets"][0]["values"]["requests"]
        .as_u64()
        .unwrap_or(0);
    let acked = increments.load(std::sync::atomic::Ordering::SeqCst);
    let attempted = sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        acked <= total && total <= attempted,
        "acknowledged {acked} increments, {attempted} attempted, {total} counted"
    );
}

#[tokio::test]
async fn the_server_makes_scheduled_backups_and_keeps_the_newest() {
    let backups = tempfile::tempdir().unwrap();
    let app = TestApp::builder()
        .embedded()
        .config("backup.interval", "1")
        .config("backup.dir", backups.path().to_str().unwrap())
        .config("backup.keep", 2)
        .spawn()
        .await;
    app.put("accounts", "a", json!({"n": 1})).await;
    let manifests = || {
        std::fs::read_dir(backups.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().ends_with(".manifest.json"))
            .collect::<Vec<_>>()
    };
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let kept = manifests();
    assert_eq!(kept.len(), 2, "{kept:?}");
    for manifest in kept {
        let verify = cli(&app, &["backup", "verify", manifest.to_str().unwrap()]).await;
        assert!(verify.status.success(), "{}", text(&verify));
        let stated: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        assert_eq!(stated["records"]["accounts"], 1);
    }
    // What the backup alerts watch.
    let metrics = metrics_text(&app).await;
    assert!(
        metrics.contains("hybridstore_backup_interval_seconds 1\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("hybridstore_backups_total{outcome=\"made\"} 0\n"));
    assert!(metrics.contains("hybridstore_backups_total{outcome=\"failed\"} 0\n"));
    let last: f64 = sample(&metrics, "hybridstore_backup_last_made_timestamp_seconds");
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!(now - last < 3.0, "last backup {last}, now {now}");
}

async fn metrics_text(app: &TestApp) -> String {
    app.open_text("/metrics").await
}

fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {metrics}"))
}

#[tokio::test]
async fn a_scheduled_backup_that_fails_is_counted_for_the_alert() {
    // A backup directory that cannot be made (a file is in the way).
    let blocker = tempfile::NamedTempFile::new().unwrap();
    let dir = blocker.path().join("backups");
    let app = TestApp::builder()
        .embedded()
        .config("backup.interval", "1")
        .config("backup.dir", dir.to_str().unwrap())
        .spawn()
        .await;
    assert!(
        until(Duration::from_secs(5), || async {
            metrics_text(&app)
                .await
                .contains("hybridstore_backups_total{outcome=\"failed\"} 1\n")
        })
        .await
    );
    let metrics = metrics_text(&app).await;
    assert!(metrics.contains("hybridstore_backups_total{outcome=\"made\"} 0\n"));
    assert_eq!(
        sample(&metrics, "hybridstore_backup_last_made_timestamp_seconds"),
        0.0
    );
}

#[tokio::test]
async fn a_hub_settings_file_is_imported_once_and_a_malformed_one_changes_nothing() {
    let app = spawn(Mode::Embedded).await;
    let files = tempfile::tempdir().unwrap();
    let settings = files.path().join("mcp_settings.json");
    std::fs::write(
        &settings,
        json!({
            "mcpServers": {
                "fetch": {"command": "uvx", "args": ["mcp-server-fetch"]},
                "time": {"command": "uvx", "args": ["mcp-server-time"], "enabled": false}
            },
            "users": [{"username": "admin", "password": "$2b$10$hash", "isAdmin": true}],
            "groups": [{"id": "g1", "name": "dev", "servers": ["fetch"]}],
            "systemConfig": {"routing": {"enableGlobalRoute": true}},
            // Part of MCPHub's settings type: per-user routing.
            "userConfigs": {"admin": {"routing": {"enableGlobalRoute": false}}}
        })
        .to_string(),
    )
    .unwrap();
    let path = settings.to_str().unwrap();
    let first = cli(&app, &["--json", "import-mcphub", path]).await;
    assert!(first.status.success(), "{}", text(&first));
    let report: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(
        report["collections"]["mcp_servers"]["created"], 2,
        "{report}"
    );
    let fetch: Value = app
        .lookup("mcp_servers", "name", "fetch")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(fetch["data"]["command"], "uvx");
    let admin: Value = app.get("users", "admin").await.json().await.unwrap();
    assert_eq!(admin["data"]["isAdmin"], true);
    assert_eq!(
        app.get("settings", "systemConfig").await.status(),
        StatusCode::OK
    );
    let configs: Value = app
        .get("settings", "userConfigs")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        configs["data"]["admin"]["routing"]["enableGlobalRoute"],
        false
    );
    // The users' password hashes are not for a read:* token; the rest is.
    for (path, status) in [
        ("/v1/collections/users/records/admin", StatusCode::FORBIDDEN),
        ("/v1/collections/mcp_servers/records/fetch", StatusCode::OK),
    ] {
        let answer = app
            .request(Method::GET, path, Some(hybridstore_testkit::READER_TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status, "read:* on {path}");
    }

    let second = cli(&app, &["--json", "import-mcphub", path]).await;
    let report: Value = serde_json::from_slice(&second.stdout).unwrap();
    for collection in ["mcp_servers", "users", "groups", "settings"] {
        assert_eq!(report["collections"][collection]["created"], 0, "{report}");
        assert_eq!(report["collections"][collection]["updated"], 0, "{report}");
    }

    let malformed = files.path().join("broken.json");
    std::fs::write(
        &malformed,
        json!({"mcpServers": {"new-one": {"command": "x"}}, "users": [{"name": "no username"}]})
            .to_string(),
    )
    .unwrap();
    let refused = cli(&app, &["import-mcphub", malformed.to_str().unwrap()]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("users[0]"), "{}", text(&refused));
    assert_eq!(
        app.get("mcp_servers", "new-one").await.status(),
        StatusCode::NOT_FOUND
    );
}

/// An export whose source fails half-way (a row it cannot read) ends with a
/// `failed` line that says why, instead of a body cut off. No importer takes
/// it, and the CLI reports a failed export and leaves nothing under the file
/// name it was given.
#[tokio::test]
async fn an_export_that_fails_half_way_says_why_and_leaves_no_file() {
    let (builder, hooked) = TestApp::builder().hooked();
    let app = builder.spawn().await;
    for n in 0..1500 {
        app.write_postgres_row("accounts", &format!("r{n:04}"), 1 + n, json!({"n": n}))
            .await;
    }
    hooked.fail_scans_after(1);
    let body = app
        .admin(Method::GET, "/admin/database/export")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .expect("the body ends normally, not cut off");
    let last: Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "failed", "{last}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("could not be read"),
        "{last}"
    );
    assert!(!body.contains(r#""type":"end""#));

    let import = app
        .admin(Method::POST, "/admin/database/import")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(import.status(), StatusCode::BAD_REQUEST);
    let problem: Value = import.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("the export failed at its source"),
        "{problem}"
    );

    hooked.fail_scans_after(1);
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("export.ndjson");
    let exported = cli(&app, &["export", "--output", path.to_str().unwrap()]).await;
    assert!(!exported.status.success(), "{}", text(&exported));
    assert!(
        text(&exported).contains("could not be read"),
        "{}",
        text(&exported)
    );
    assert!(!path.exists(), "nothing under the final name");
    let left: Vec<_> = std::fs::read_dir(files.path()).unwrap().collect();
    assert!(left.is_empty(), "no temporary file left: {left:?}");

    hooked.fail_scans_after(1);
    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path().to_str().unwrap();
    let created = cli(&app, &["backup", "create", "--dir", dir]).await;
    assert!(!created.status.success(), "{}", text(&created));
    let left: Vec<_> = std::fs::read_dir(backups.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "no backup, not even a partial one: {left:?}"
    );
}
