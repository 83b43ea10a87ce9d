//! Operations endpoints: Prometheus metrics and request ids.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use hybridstore_testkit::{Redis, RedisPersistence, TestApp, blocking, shared, until};
use reqwest::StatusCode;
use serde_json::json;

/// A scrape of `/metrics`: every sample, keyed `name{labels}` as printed.
pub struct Scrape {
    pub text: String,
    pub samples: HashMap<String, f64>,
}

impl Scrape {
    /// The value of the sample whose name is `name` and whose labels include
    /// every `name="value"` pair given.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .filter(|(key, _)| {
                key.split('{').next() == Some(name)
                    && labels
                        .iter()
                        .all(|(k, v)| key.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, value)| *value)
            .next()
    }

    /// Metric family names present (from `# TYPE` lines).
    pub fn families(&self) -> Vec<String> {
        self.text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }
}

pub async fn scrape(app: &TestApp) -> Scrape {
    let response = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "unauthenticated scrape");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    let samples = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect();
    Scrape { text, samples }
}

const RECORD_ROUTE: &str = "/v1/collections/{collection}/records/{id}";

#[tokio::test]
async fn metrics_count_requests_operations_and_tiers_in_prometheus_format() {
    let app = TestApp::builder().spawn().await;
    // Idle first: the probes (4 a second per tier), replay polling and
    // control sync run, and none of it counts as calls made for requests.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let idle = scrape(&app).await;
    for tier in ["cache", "durable"] {
        let request = [("tier", tier), ("origin", "request")];
        assert_eq!(
            idle.value("hybridstore_tier_calls_total", &request),
            Some(0.0),
            "{tier}: an idle service made no request calls"
        );
    }
    let background = [("tier", "cache"), ("origin", "background")];
    assert!(
        idle.value("hybridstore_tier_calls_total", &background) > Some(0.0),
        "the replay polls the cache"
    );
    assert!(
        idle.value("process_resident_memory_bytes", &[]) > Some(1_000_000.0),
        "{}",
        idle.text
    );
    assert_eq!(
        idle.value("hybridstore_backup_interval_seconds", &[]),
        Some(0.0),
        "no scheduled backups in tests"
    );
    assert_eq!(
        app.increment("usage:k", json!({"deltas": {"requests": 1}}))
            .await
            .status(),
        StatusCode::OK
    );
    app.read_counters("usage:k", "granularity=total").await;
    assert_eq!(
        app.put("accounts", "a", json!({"n": 1})).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(app.get("accounts", "a").await.status(), StatusCode::OK);
    assert_eq!(
        app.get("accounts", "b").await.status(),
        StatusCode::NOT_FOUND
    );
    let stale = app
        .admin(reqwest::Method::PUT, "/v1/collections/accounts/records/a")
        .header("if-match", "\"1\"")
        .json(&json!({"n": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);

    let scrape = scrape(&app).await;
    let put = [
        ("method", "PUT"),
        ("route", RECORD_ROUTE),
        ("status", "201"),
    ];
    assert_eq!(
        scrape.value("http_requests_total", &put),
        Some(1.0),
        "{}",
        scrape.text
    );
    let gets = [("method", "GET"), ("route", RECORD_ROUTE)];
    assert_eq!(
        scrape.value("http_request_duration_seconds_count", &gets),
        Some(2.0)
    );
    let bucket = [("method", "GET"), ("route", RECORD_ROUTE), ("le", "+Inf")];
    assert_eq!(
        scrape.value("http_request_duration_seconds_bucket", &bucket),
        Some(2.0)
    );
    for operation in ["increment", "counter_read"] {
        let ok = [("operation", operation), ("outcome", "ok")];
        assert_eq!(
            scrape.value("hybridstore_operations_total", &ok),
            Some(1.0),
            "{operation}"
        );
    }
    let ok_put = [("operation", "put"), ("outcome", "ok")];
    assert_eq!(
        scrape.value("hybridstore_operations_total", &ok_put),
        Some(1.0)
    );
    let rejected = [("operation", "put"), ("outcome", "rejected")];
    assert_eq!(
        scrape.value("hybridstore_operations_total", &rejected),
        Some(1.0),
        "a failed precondition is the client's business"
    );
    assert_eq!(scrape.value("hybridstore_cache_hits_total", &[]), Some(1.0));
    assert_eq!(
        scrape.value("hybridstore_cache_misses_total", &[]),
        Some(1.0)
    );
    let latency = [("operation", "get"), ("le", "10")];
    assert_eq!(
        scrape.value("hybridstore_operation_duration_seconds_bucket", &latency),
        Some(2.0)
    );
    let durable = [("tier", "durable"), ("origin", "request")];
    assert!(scrape.value("hybridstore_tier_calls_total", &durable) >= Some(2.0));
    assert_eq!(
        scrape.value("hybridstore_tier_up", &[("tier", "cache")]),
        Some(1.0)
    );
    let closed = [("tier", "durable"), ("state", "closed")];
    assert_eq!(
        scrape.value("hybridstore_breaker_state", &closed),
        Some(1.0)
    );
    assert_eq!(
        scrape.value("hybridstore_strategy", &[("strategy", "dual_write")]),
        Some(1.0)
    );
    assert_eq!(
        scrape.value("hybridstore_journal_backlog", &[("journal", "outage")]),
        Some(0.0)
    );
    let degraded = [("collection", "accounts")];
    assert_eq!(
        scrape.value("hybridstore_collection_degraded", &degraded),
        Some(0.0)
    );

    // promtool lints the exposition (format, names, units, _total suffixes).
    let text = scrape.text.clone();
    let lint = blocking(move || {
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus) is installed");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await;
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
}

#[tokio::test]
async fn a_cache_outage_flips_the_breaker_gauges() {
    let redis = Arc::new(blocking(|| Redis::start(RedisPersistence::None)).await);
    let postgres = blocking(|| shared().postgres.clone()).await;
    let app = TestApp::builder()
        .servers(postgres, redis.clone())
        .spawn()
        .await;
    assert_eq!(
        scrape(&app)
            .await
            .value("hybridstore_tier_up", &[("tier", "cache")]),
        Some(1.0)
    );

    let server = redis.clone();
    blocking(move || server.kill()).await;
    assert!(
        until(Duration::from_secs(10), || async {
            scrape(&app)
                .await
                .value("hybridstore_tier_up", &[("tier", "cache")])
                == Some(0.0)
        })
        .await
    );
    let down = scrape(&app).await;
    // Open, or half-open while a probe tries it: not closed.
    let closed = [("tier", "cache"), ("state", "closed")];
    assert_eq!(down.value("hybridstore_breaker_state", &closed), Some(0.0));
    let open = down.value(
        "hybridstore_breaker_state",
        &[("tier", "cache"), ("state", "open")],
    );
    let trying = down.value(
        "hybridstore_breaker_state",
        &[("tier", "cache"), ("state", "half_open")],
    );
    assert_eq!(open.unwrap() + trying.unwrap(), 1.0);
    let degradations = [("tier", "cache")];
    assert!(down.value("hybridstore_tier_degradations_total", &degradations) >= Some(1.0));
    assert_eq!(
        down.value("hybridstore_tier_up", &[("tier", "durable")]),
        Some(1.0)
    );
    assert!(down.families().contains(&"hybridstore_strategy".to_owned()));

    let server = redis.clone();
    blocking(move || server.restart()).await;
    assert!(
        until(Duration::from_secs(10), || async {
            scrape(&app)
                .await
                .value("hybridstore_tier_up", &[("tier", "cache")])
                == Some(1.0)
        })
        .await,
        "the gauge follows the recovery"
    );
}

#[tokio::test]
async fn request_ids_are_echoed_or_made_up() {
    let app = TestApp::builder().spawn().await;
    let given = app
        .http
        .get(app.url("/health"))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "req-42");
    let made = app.get("accounts", "missing").await;
    let id = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let other = app.get("accounts", "missing").await;
    assert_ne!(other.headers()["x-request-id"].to_str().unwrap(), id);
}
