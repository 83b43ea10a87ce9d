//! Usage counters against real servers: buckets, retention, bad input. (The
//! load and fault tests are in the `load` test binary.)

use std::time::Duration;

use hybridstore_core::Granularity;
use hybridstore_testkit::{READER_TOKEN, TestApp, until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap()
}

#[tokio::test]
async fn late_events_land_in_their_buckets_and_expired_buckets_leave_reads() {
    let now = OffsetDateTime::now_utc();
    let hour_ago = now - time::Duration::HOUR;
    // Hour buckets expire 3 s from now if they ended an hour ago or more.
    let last_hour_end = Granularity::Hour
        .bucket_end(Granularity::Hour.bucket_start(hour_ago))
        .unwrap();
    let retention = (now + time::Duration::seconds(3) - last_hour_end).whole_seconds();
    let app = TestApp::builder()
        .config("counters.hour_retention_secs", retention)
        .spawn()
        .await;
    let scope = "usage:late";
    let two_days_ago = now - time::Duration::days(2);
    for (at, requests) in [(now, 1), (hour_ago, 10), (two_days_ago, 100)] {
        let body = json!({"deltas": {"requests": requests}, "at": rfc3339(at)});
        assert_eq!(app.increment(scope, body).await.status(), StatusCode::OK);
    }

    let hours = app.read_counters(scope, "granularity=hour").await;
    let labels: Vec<(&str, i64)> = hours["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["bucket"].as_str().unwrap(),
                b["values"]["requests"].as_i64().unwrap(),
            )
        })
        .collect();
    let hour_label = |at| Granularity::Hour.label(Granularity::Hour.bucket_start(at));
    assert_eq!(
        labels,
        vec![
            (hour_label(hour_ago).as_str(), 10),
            (hour_label(now).as_str(), 1)
        ],
        "two days ago was past the hour retention already: not written"
    );
    let days = app.read_counters(scope, "granularity=day").await;
    let day_values: Vec<i64> = days["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["values"]["requests"].as_i64().unwrap())
        .collect();
    let same_day = Granularity::Day.bucket_start(hour_ago) == Granularity::Day.bucket_start(now);
    assert_eq!(
        day_values,
        if same_day {
            vec![100, 11]
        } else {
            vec![100, 10, 1]
        }
    );
    let total = app.read_counters(scope, "granularity=total").await;
    assert_eq!(total["buckets"][0]["values"]["requests"], 111);
    let from = rfc3339(Granularity::Day.bucket_start(now));
    let today = app
        .read_counters(scope, &format!("granularity=day&from={from}"))
        .await;
    assert_eq!(
        today["buckets"].as_array().unwrap().len(),
        1,
        "from narrows the range"
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    let hours = app.read_counters(scope, "granularity=hour").await;
    let remaining: Vec<&str> = hours["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["bucket"].as_str().unwrap())
        .collect();
    assert_eq!(
        remaining,
        vec![hour_label(now).as_str()],
        "the old hour expired"
    );
    assert!(
        until(Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM counters WHERE scope = $1 AND granularity = 'hour'",
            )
            .bind(scope)
            .fetch_one(&app.pg().db)
            .await
            .unwrap()
                == 1
        })
        .await,
        "the purge removed the expired row"
    );
}

#[tokio::test]
async fn bad_increments_are_refused_and_apply_nothing() {
    let app = TestApp::builder().spawn().await;
    let scope = "usage:bad";
    let many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("f{i}"), json!(1))).collect();
    let future = rfc3339(OffsetDateTime::now_utc() + time::Duration::HOUR);
    let cases: Vec<(&str, String, &str, StatusCode)> = vec![
        (
            scope,
            r#"{"deltas": {"requests": "1"}}"#.into(),
            "invalid_request",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            r#"{"deltas": {"requests": NaN}}"#.into(),
            "invalid_json",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            r#"{"deltas": {"requests": 1e400}}"#.into(),
            "invalid_request",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            r#"{"deltas": {"requests": null}}"#.into(),
            "invalid_request",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            r#"{"deltas": {}}"#.into(),
            "invalid_request",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            json!({"deltas": many}).to_string(),
            "invalid_request",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            r#"{"deltas": {"Cost": 1}}"#.into(),
            "invalid_name",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            r#"{"deltas": {"cost": 0.0000000001}}"#.into(),
            "invalid_request",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            r#"{"deltas": {"cost": 1e16}}"#.into(),
            "invalid_request",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            format!(r#"{{"deltas": {{"requests": 1}}, "at": "{future}"}}"#),
            "invalid_request",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            r#"{"deltas": {"requests": 1}, "at": "yesterday"}"#.into(),
            "invalid_request",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            r#"{"deltas": {"requests": 1}, "extra": true}"#.into(),
            "invalid_json",
            StatusCode::BAD_REQUEST,
        ),
        (
            scope,
            r#"[1]"#.into(),
            "invalid_json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "bad%20scope",
            r#"{"deltas": {"requests": 1}}"#.into(),
            "invalid_name",
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (scope, body, code, status) in &cases {
        let response = app
            .admin(
                reqwest::Method::POST,
                &format!("/v1/counters/{scope}/increment"),
            )
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), *status, "{body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], *code, "{body}: {problem}");
    }
    let denied = app
        .http
        .post(app.url(&format!("/v1/counters/{scope}/increment")))
        .bearer_auth(READER_TOKEN)
        .json(&json!({"deltas": {"requests": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    let (status, _) = app
        .admin_call(
            reqwest::Method::GET,
            &format!("/v1/counters/{scope}?granularity=week"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    assert!(app.postgres_counters(scope, "total").await.is_empty());
    assert!(app.redis_totals(scope).await.is_empty());
    assert_eq!(app.counter_backlog().await, 0);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM counters")
        .fetch_one(&app.pg().db)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing applied");
}

/// A read whose range starts long before anything retained walks retained
/// buckets only: it answers what a read from the oldest retained bucket
/// answers, and eight of them at once do not hold `/health` back (on the
/// walk from year 0, one hour at a time, they held it for seconds).
#[tokio::test]
async fn a_range_from_year_zero_walks_only_retained_buckets() {
    let app = TestApp::builder().spawn().await;
    let scope = "usage:ancient";
    let body = json!({"deltas": {"requests": 3}});
    assert_eq!(app.increment(scope, body).await.status(), StatusCode::OK);
    let query = "granularity=hour&from=0000-01-01T00:00:00Z";
    let ancient = app.read_counters(scope, query).await;
    let default = app.read_counters(scope, "granularity=hour").await;
    assert_eq!(ancient["buckets"], default["buckets"]);
    assert!(!default["buckets"].as_array().unwrap().is_empty());

    // Nothing retained in a range that ends before the oldest bucket.
    let old = app
        .read_counters(
            scope,
            "granularity=hour&from=0000-01-01T00:00:00Z&to=0001-01-01T00:00:00Z",
        )
        .await;
    assert_eq!(old["buckets"], json!([]));

    let reads: Vec<_> = (0..8)
        .map(|_| {
            let request = app
                .admin(
                    reqwest::Method::GET,
                    &format!("/v1/counters/{scope}?{query}"),
                )
                .send();
            tokio::spawn(request)
        })
        .collect();
    let started = std::time::Instant::now();
    let health = app.http.get(app.url("/health")).send().await.unwrap();
    let waited = started.elapsed();
    assert_eq!(health.status(), StatusCode::OK);
    for read in reads {
        assert_eq!(read.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert!(
        waited < Duration::from_secs(1),
        "/health waited {waited:?} behind the reads"
    );
}

/// A delta is taken from the number's text as the client sent it, never
/// through an `f64`: 17 significant digits reach both tiers exactly, and a
/// value just above the bound is refused rather than rounded into it.
#[tokio::test]
async fn deltas_keep_every_digit_of_the_numbers_text() {
    let app = TestApp::builder().spawn().await;
    let scope = "usage:exact";
    let body = r#"{"deltas": {"cost": 123456789.123456789, "tiny": 0.000000001}}"#;
    let response = app
        .admin(
            reqwest::Method::POST,
            &format!("/v1/counters/{scope}/increment"),
        )
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    assert!(
        text.contains(r#""totals":{"cost":123456789.123456789,"tiny":0.000000001}"#),
        "the answer carries every digit: {text}"
    );
    let read = app
        .admin(reqwest::Method::GET, &format!("/v1/counters/{scope}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        read.contains(r#""values":{"cost":123456789.123456789,"tiny":0.000000001}"#),
        "so does a read: {read}"
    );
    let expected: std::collections::BTreeMap<String, String> = [
        ("cost".to_owned(), "123456789.123456789".to_owned()),
        ("tiny".to_owned(), "0.000000001".to_owned()),
    ]
    .into();
    assert_eq!(app.redis_totals(scope).await, expected, "Redis");
    assert!(
        until(Duration::from_secs(10), || async {
            app.postgres_counters(scope, "total").await == expected
        })
        .await,
        "PostgreSQL holds {:?}",
        app.postgres_counters(scope, "total").await
    );

    let above = app
        .admin(
            reqwest::Method::POST,
            &format!("/v1/counters/{scope}/increment"),
        )
        .header("content-type", "application/json")
        .body(r#"{"deltas": {"cost": 1000000000000000.000000001}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(above.status(), StatusCode::BAD_REQUEST);
    let problem: Value = above.json().await.unwrap();
    assert_eq!(problem["code"], "invalid_request");
    assert_eq!(app.redis_totals(scope).await, expected, "nothing applied");
}

/// A total is kept within +-10^18 in every tier: the thousandth increment
/// of the largest delta lands exactly on the bound, the next one is refused
/// with `counter_out_of_range` and applies nothing, in either tier, in both
/// modes and both ways counters are written (the cache's script, the
/// durable tier's transaction). Before, Redis and PostgreSQL took it and
/// every export and backup failed on the total.
#[tokio::test]
async fn an_increment_past_the_largest_total_is_refused_and_applies_nothing() {
    for (embedded, strategy) in [
        (false, "cache_first"),
        (false, "dual_write"),
        (true, "cache_first"),
        (true, "dual_write"),
    ] {
        let mut builder = TestApp::builder().config("counters.strategy", strategy);
        if embedded {
            builder = builder.embedded();
        }
        let app = builder.spawn().await;
        let what = format!("{strategy}, embedded: {embedded}");
        let scope = "usage:bound";
        let mut sent = 0;
        while sent < 1000 {
            let batch: Vec<_> = (0..20)
                .map(|_| {
                    app.increment(
                        scope,
                        json!({"deltas": {"tokens": 1_000_000_000_000_000u64}}),
                    )
                })
                .collect();
            for response in futures_util::future::join_all(batch).await {
                assert_eq!(response.status(), StatusCode::OK, "{what}");
            }
            sent += 20;
        }
        for body in [
            json!({"deltas": {"tokens": 1}}),
            json!({"deltas": {"other": 5, "tokens": 0.000000001}}),
        ] {
            let refused = app.increment(scope, body.clone()).await;
            assert_eq!(
                refused.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{what}: {body}"
            );
            let problem: Value = refused.json().await.unwrap();
            assert_eq!(problem["code"], "counter_out_of_range", "{what}");
        }
        let total = app.read_counters(scope, "granularity=total").await;
        assert_eq!(
            total["buckets"][0]["values"],
            json!({"tokens": 1_000_000_000_000_000_000u64}),
            "{what}: the refused increments applied nothing (not even `other`)"
        );
        if !embedded {
            let expected: std::collections::BTreeMap<String, String> =
                [("tokens".to_owned(), "1000000000000000000".to_owned())].into();
            assert!(
                until(Duration::from_secs(10), || async {
                    app.postgres_counters(scope, "total").await == expected
                })
                .await,
                "{what}: PostgreSQL holds {:?}",
                app.postgres_counters(scope, "total").await
            );
        }
        // Going back down is allowed.
        let down = app
            .increment(scope, json!({"deltas": {"tokens": -1}}))
            .await;
        assert_eq!(down.status(), StatusCode::OK, "{what}");
    }
}
