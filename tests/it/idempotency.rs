//! Idempotency-Key on mutating calls: a retry answers with the first
//! response and applies nothing again.

use std::time::Duration;

use hybridstore_testkit::{ADMIN_TOKEN, TestApp, etag_version, until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn increment_with_key(
    app: &TestApp,
    http: &reqwest::Client,
    scope: &str,
    key: &str,
    body: &Value,
) -> Result<reqwest::Response, reqwest::Error> {
    http.post(app.url(&format!("/v1/counters/{scope}/increment")))
        .bearer_auth(ADMIN_TOKEN)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
}

async fn drained_requests(app: &TestApp, scope: &str) -> String {
    assert!(
        until(Duration::from_secs(20), || async {
            app.counter_backlog().await == 0
        })
        .await
    );
    app.postgres_counters(scope, "total").await["requests"].clone()
}

#[tokio::test]
async fn a_retried_increment_is_answered_again_and_counted_once() {
    let app = TestApp::builder().spawn().await;
    let scope = "usage:idem";
    let body = json!({"deltas": {"requests": 1, "cost_usd": 0.25}});
    let first = increment_with_key(&app, &app.http, scope, "req-1", &body)
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let again = increment_with_key(&app, &app.http, scope, "req-1", &body)
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.json::<Value>().await.unwrap(),
        first,
        "the first response"
    );

    // The same key for another request is refused, and applies nothing.
    let other = json!({"deltas": {"requests": 5}});
    let reused = increment_with_key(&app, &app.http, scope, "req-1", &other)
        .await
        .unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reused.json::<Value>().await.unwrap()["code"],
        "idempotency_key_reused"
    );
    let bad = increment_with_key(&app, &app.http, scope, "with space", &body)
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    assert_eq!(drained_requests(&app, scope).await, "1");
    assert_eq!(app.redis_totals(scope).await["requests"], "1");
    assert_eq!(app.redis_totals(scope).await["cost_usd"], "0.25");
}

#[tokio::test]
async fn a_client_that_times_out_and_retries_is_counted_once() {
    let app = TestApp::builder().spawn().await;
    let scope = "usage:impatient";
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(1))
        .build()
        .unwrap();
    for n in 0..5 {
        let key = format!("call-{n}");
        let body = json!({"deltas": {"requests": 1}});
        // The first attempt gives up at once: it may or may not have
        // reached the service.
        let _ = increment_with_key(&app, &impatient, scope, &key, &body).await;
        loop {
            let response = increment_with_key(&app, &app.http, scope, &key, &body)
                .await
                .unwrap();
            match response.status() {
                StatusCode::OK => break,
                StatusCode::CONFLICT => tokio::time::sleep(Duration::from_millis(50)).await,
                other => panic!("{other}: {}", response.text().await.unwrap()),
            }
        }
    }
    assert_eq!(drained_requests(&app, scope).await, "5");
    assert_eq!(app.redis_totals(scope).await["requests"], "5");
}

#[tokio::test]
async fn record_writes_replay_their_first_response() {
    let app = TestApp::builder().spawn().await;
    let put = |key: &'static str, data: Value| {
        let app = &app;
        async move {
            app.admin(Method::PUT, "/v1/collections/accounts/records/a1")
                .header("idempotency-key", key)
                .json(&data)
                .send()
                .await
                .unwrap()
        }
    };
    let first = put("put-1", json!({"n": 1})).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let version = etag_version(&first);
    let again = put("put-1", json!({"n": 1})).await;
    assert_eq!(
        again.status(),
        StatusCode::CREATED,
        "the first answer, again"
    );
    assert_eq!(etag_version(&again), version);
    assert_eq!(
        app.postgres_copy("accounts", "a1").await.unwrap().version,
        version
    );

    let delete = || async {
        app.admin(Method::DELETE, "/v1/collections/accounts/records/a1")
            .header("idempotency-key", "delete-1")
            .send()
            .await
            .unwrap()
    };
    assert_eq!(delete().await.status(), StatusCode::NO_CONTENT);
    let replayed = delete().await;
    assert_eq!(replayed.status(), StatusCode::NO_CONTENT, "not 404");
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    // A read is never replayed.
    let read = app
        .admin(Method::GET, "/v1/collections/accounts/records/a1")
        .header("idempotency-key", "delete-1")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::NOT_FOUND);
}

/// What stored responses take of the cache is bounded per caller and in
/// all, in count and in bytes: past a bound the call still runs, answers
/// `Idempotent-Stored: false`, and its retry runs again instead of being
/// replayed; another caller keeps its own room; responses stored before
/// still replay. In both modes. (Before, every response was kept 24 h
/// without any bound: a flood of 1 MiB writes filled Redis or the process.)
#[tokio::test]
async fn stored_responses_are_bounded_per_caller_and_say_when_not_kept() {
    use hybridstore_testkit::API_KEYS_WRITER_TOKEN;
    for embedded in [false, true] {
        let mut builder = TestApp::builder()
            .config("idempotency.caller_max_responses", 3)
            .config("idempotency.caller_max_bytes", 64 * 1024);
        if embedded {
            builder = builder.embedded();
        }
        let app = builder.spawn().await;
        let what = format!("embedded: {embedded}");
        let put = |token: &'static str, collection: &str, id: &str, key: &str, data: Value| {
            app.request(
                Method::PUT,
                &format!("/v1/collections/{collection}/records/{id}"),
                Some(token),
            )
            .header("idempotency-key", key.to_owned())
            .json(&data)
        };
        let stored = |response: &reqwest::Response| {
            response
                .headers()
                .get("idempotent-stored")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        // Three small responses fit; the fourth is past the count.
        for n in 0..3 {
            let first = put(
                ADMIN_TOKEN,
                "accounts",
                &format!("a{n}"),
                &format!("k{n}"),
                json!({"n": n}),
            )
            .send()
            .await
            .unwrap();
            assert_eq!(first.status(), StatusCode::CREATED, "{what}");
            assert_eq!(stored(&first), None, "{what}: kept");
        }
        let fourth = put(ADMIN_TOKEN, "accounts", "a3", "k3", json!({"n": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(fourth.status(), StatusCode::CREATED, "{what}: the call ran");
        assert_eq!(stored(&fourth).as_deref(), Some("false"), "{what}");
        let again = put(ADMIN_TOKEN, "accounts", "a3", "k3", json!({"n": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            again.status(),
            StatusCode::OK,
            "{what}: the retry ran again"
        );
        assert!(
            again.headers().get("idempotent-replayed").is_none(),
            "{what}"
        );
        let replayed = put(ADMIN_TOKEN, "accounts", "a0", "k0", json!({"n": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(replayed.status(), StatusCode::CREATED, "{what}: replayed");
        assert_eq!(
            replayed.headers().get("idempotent-replayed").unwrap(),
            "true",
            "{what}"
        );
        // Another caller has its own room, bounded in bytes: 40 KiB fits
        // within 64 KiB, a second 40 KiB does not.
        let blob = "y".repeat(40 * 1024);
        let big = put(
            API_KEYS_WRITER_TOKEN,
            "api_keys",
            "b0",
            "b0",
            json!({"key_hash": "h0", "blob": blob}),
        )
        .send()
        .await
        .unwrap();
        assert!(big.status().is_success(), "{what}: {}", big.status());
        assert_eq!(stored(&big), None, "{what}: the other caller's room");
        let bigger = put(
            API_KEYS_WRITER_TOKEN,
            "api_keys",
            "b1",
            "b1",
            json!({"key_hash": "h1", "blob": blob}),
        )
        .send()
        .await
        .unwrap();
        assert!(bigger.status().is_success(), "{what}");
        assert_eq!(
            stored(&bigger).as_deref(),
            Some("false"),
            "{what}: past the bytes"
        );
    }
}
