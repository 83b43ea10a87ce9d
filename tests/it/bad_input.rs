//! Bad input: every case answers a 4xx problem+json with a stable code, and
//! nothing reaches either tier.

use hybridstore_testkit::{ADMIN_TOKEN, API_KEYS_WRITER_TOKEN, READER_TOKEN, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn app_with_schema() -> TestApp {
    TestApp::builder()
        .config(
            "collections.widgets.schema",
            json!({
                "type": "object",
                "required": ["name"],
                "properties": { "name": { "type": "string" }, "size": { "type": "integer", "minimum": 1 } }
            }),
        )
        .config("collections.widgets.unique_indexes", json!(["name"]))
        .spawn()
        .await
}

struct Case {
    what: &'static str,
    method: Method,
    path: String,
    token: Option<&'static str>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    headers: Vec<(&'static str, &'static str)>,
    status: StatusCode,
    code: &'static str,
}

fn case(
    what: &'static str,
    method: Method,
    path: &str,
    status: StatusCode,
    code: &'static str,
) -> Case {
    Case {
        what,
        method,
        path: path.to_owned(),
        token: Some(ADMIN_TOKEN),
        content_type: Some("application/json"),
        body: br#"{"name": "w"}"#.to_vec(),
        headers: Vec::new(),
        status,
        code,
    }
}

impl Case {
    fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
    fn content_type(mut self, content_type: Option<&'static str>) -> Self {
        self.content_type = content_type;
        self
    }
    fn token(mut self, token: Option<&'static str>) -> Self {
        self.token = token;
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }
}

async fn check(app: &TestApp, case: Case) {
    let mut request = app.request(case.method.clone(), &case.path, case.token);
    if let Some(content_type) = case.content_type {
        request = request.header("content-type", content_type);
    }
    for (name, value) in &case.headers {
        request = request.header(*name, *value);
    }
    let response = request.body(case.body).send().await.expect(case.what);
    assert_eq!(response.status(), case.status, "{}", case.what);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{}",
        case.what
    );
    if case.status == StatusCode::UNAUTHORIZED {
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer",
            "{}",
            case.what
        );
    }
    let problem: Value = response.json().await.expect(case.what);
    assert_eq!(problem["code"], case.code, "{}: {problem}", case.what);
    assert_eq!(problem["status"], case.status.as_u16(), "{}", case.what);
    assert!(
        problem["title"].is_string() && problem["detail"].is_string(),
        "{}",
        case.what
    );
}

#[tokio::test]
async fn bad_requests_are_refused_with_a_problem_and_write_nothing() {
    let app = app_with_schema().await;
    let widget = "/v1/collections/widgets/records/w1";
    let too_long_id = format!("/v1/collections/widgets/records/{}", "a".repeat(256));
    let oversized = format!(r#"{{"name": "{}"}}"#, "x".repeat(1024 * 1024 + 1));
    use Method as M;
    use StatusCode as S;
    let cases = vec![
        case(
            "malformed JSON",
            M::PUT,
            widget,
            S::BAD_REQUEST,
            "invalid_json",
        )
        .body(r#"{"name": "#),
        case("array body", M::PUT, widget, S::BAD_REQUEST, "invalid_json").body("[1, 2]"),
        case(
            "string body",
            M::PUT,
            widget,
            S::BAD_REQUEST,
            "invalid_json",
        )
        .body(r#""w""#),
        case("empty body", M::PUT, widget, S::BAD_REQUEST, "invalid_json").body(""),
        case(
            "text/plain",
            M::PUT,
            widget,
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .content_type(Some("text/plain")),
        case(
            "no content type",
            M::PUT,
            widget,
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .content_type(None),
        case(
            "oversized body",
            M::PUT,
            widget,
            S::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        )
        .body(oversized),
        case(
            "invalid collection name",
            M::PUT,
            "/v1/collections/Widgets/records/w1",
            S::BAD_REQUEST,
            "invalid_name",
        ),
        case(
            "invalid id",
            M::PUT,
            "/v1/collections/widgets/records/-w1",
            S::BAD_REQUEST,
            "invalid_name",
        ),
        case(
            "id too long",
            M::PUT,
            &too_long_id,
            S::BAD_REQUEST,
            "invalid_name",
        ),
        case(
            "unknown collection",
            M::PUT,
            "/v1/collections/gadgets/records/w1",
            S::NOT_FOUND,
            "unknown_collection",
        ),
        case(
            "schema: wrong type",
            M::PUT,
            widget,
            S::UNPROCESSABLE_ENTITY,
            "schema_violation",
        )
        .body(r#"{"name": 5}"#),
        case(
            "schema: missing field",
            M::PUT,
            widget,
            S::UNPROCESSABLE_ENTITY,
            "schema_violation",
        )
        .body(r#"{"size": 2}"#),
        case(
            "schema: below minimum",
            M::PUT,
            widget,
            S::UNPROCESSABLE_ENTITY,
            "schema_violation",
        )
        .body(r#"{"name": "w", "size": 0}"#),
        case("no token", M::PUT, widget, S::UNAUTHORIZED, "unauthorized").token(None),
        case(
            "wrong token",
            M::PUT,
            widget,
            S::UNAUTHORIZED,
            "unauthorized",
        )
        .token(Some("not-a-known-token-at-all")),
        case(
            "read-only token writes",
            M::PUT,
            widget,
            S::FORBIDDEN,
            "forbidden",
        )
        .token(Some(READER_TOKEN)),
        case(
            "token scoped to another collection",
            M::PUT,
            widget,
            S::FORBIDDEN,
            "forbidden",
        )
        .token(Some(API_KEYS_WRITER_TOKEN)),
        case(
            "token scoped to another collection reads",
            M::GET,
            widget,
            S::FORBIDDEN,
            "forbidden",
        )
        .token(Some(API_KEYS_WRITER_TOKEN)),
        case(
            "ttl zero",
            M::PUT,
            "/v1/collections/widgets/records/w1?ttl=0",
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "ttl not a number",
            M::PUT,
            "/v1/collections/widgets/records/w1?ttl=soon",
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "unknown parameter",
            M::PUT,
            "/v1/collections/widgets/records/w1?tll=5",
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "nested deeper than every tier can export",
            M::PUT,
            widget,
            S::BAD_REQUEST,
            "invalid_json",
        )
        .body(format!(
            r#"{{"name": "w", "deep": {}1{}}}"#,
            "[".repeat(hybridstore_core::MAX_DATA_DEPTH),
            "]".repeat(hybridstore_core::MAX_DATA_DEPTH)
        )),
        case(
            "malformed If-Match",
            M::PUT,
            widget,
            S::BAD_REQUEST,
            "invalid_request",
        )
        .header("if-match", "7"),
        case(
            "PATCH of a missing record",
            M::PATCH,
            widget,
            S::NOT_FOUND,
            "not_found",
        ),
        case(
            "batch-get without ids",
            M::POST,
            "/v1/collections/widgets/batch-get",
            S::BAD_REQUEST,
            "invalid_json",
        )
        .body(r#"{"id": ["a"]}"#),
        case(
            "batch-get with a bad id",
            M::POST,
            "/v1/collections/widgets/batch-get",
            S::BAD_REQUEST,
            "invalid_name",
        )
        .body(r#"{"ids": ["ok", "not ok"]}"#),
        case(
            "list limit zero",
            M::GET,
            "/v1/collections/widgets/records?limit=0",
            S::BAD_REQUEST,
            "invalid_request",
        ),
        case(
            "unknown route",
            M::GET,
            "/v1/nothing-here",
            S::NOT_FOUND,
            "not_found",
        ),
        case(
            "wrong method",
            M::POST,
            widget,
            S::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for case in cases {
        check(&app, case).await;
    }
    assert_eq!(
        app.postgres_row_count().await,
        0,
        "nothing reached PostgreSQL"
    );
    assert_eq!(
        app.redis_keys().await,
        Vec::<String>::new(),
        "nothing reached Redis"
    );
}

#[tokio::test]
async fn a_patch_that_breaks_the_schema_changes_nothing() {
    let app = app_with_schema().await;
    let created = app
        .put("widgets", "w1", json!({"name": "w", "size": 3}))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let before = app.postgres_copy("widgets", "w1").await.unwrap();

    for (patch, code) in [
        (json!({"size": "big"}), "schema_violation"),
        (json!({"name": null}), "schema_violation"),
        (json!({"name": {"nested": true}}), "schema_violation"),
    ] {
        let response = app
            .admin(Method::PATCH, "/v1/collections/widgets/records/w1")
            .json(&patch)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{patch}"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], code);
        assert!(
            problem["errors"].as_array().is_some_and(|e| !e.is_empty()),
            "{problem}"
        );
    }
    assert_eq!(
        app.postgres_copy("widgets", "w1").await,
        Some(before.clone())
    );
    assert_eq!(app.redis_copy("widgets", "w1").await, Some(before));
}

#[tokio::test]
async fn scoped_tokens_can_do_what_their_scopes_say() {
    let app = app_with_schema().await;
    let writer = app
        .request(
            Method::PUT,
            "/v1/collections/api_keys/records/k1",
            Some(API_KEYS_WRITER_TOKEN),
        )
        .json(&json!({"key_hash": "h1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(writer.status(), StatusCode::CREATED);
    let reader = app
        .request(
            Method::GET,
            "/v1/collections/api_keys/records/k1",
            Some(READER_TOKEN),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reader.status(), StatusCode::OK);
    let health = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "health needs no token");
}

/// U+0000 in a string is valid JSON, and Redis and SQLite would take it, but
/// PostgreSQL's jsonb refuses it: accepted once, it could never reach the
/// durable tier (and would stop the journal's replay). Refused in every
/// strategy, for puts and for what a patch would make, and nothing is written.
#[tokio::test]
async fn a_nul_character_is_refused_before_any_tier_sees_it() {
    let app = TestApp::builder()
        .config("collections.groups.strategy", "cache_first")
        .spawn()
        .await;
    for collection in ["accounts", "groups"] {
        let existing = app.put(collection, "g", json!({"n": 1})).await;
        assert_eq!(existing.status(), StatusCode::CREATED);
    }
    let bodies = [
        r#"{"name": "a\u0000b"}"#,
        r#"{"nested": {"list": [1, "x\u0000"]}}"#,
        r#"{"key\u0000": 1}"#,
    ];
    for collection in ["accounts", "groups"] {
        for body in bodies {
            // Malformed whatever the record's state: also a patch of a
            // missing record (not 404) and one with a stale If-Match (not
            // 412); schemathesis once got a 412 for such a patch.
            for (method, id, if_match) in [
                (Method::PUT, "nul", None),
                (Method::PATCH, "g", None),
                (Method::PATCH, "absent", None),
                (Method::PATCH, "g", Some("\"1\"")),
            ] {
                let mut request = app
                    .admin(
                        method.clone(),
                        &format!("/v1/collections/{collection}/records/{id}"),
                    )
                    .header("content-type", "application/json");
                if let Some(tag) = if_match {
                    request = request.header("if-match", tag);
                }
                let response = request.body(body).send().await.unwrap();
                let status = response.status();
                let problem: Value = response.json().await.unwrap();
                assert_eq!(
                    (status, problem["code"].as_str()),
                    (StatusCode::BAD_REQUEST, Some("invalid_json")),
                    "{method} {collection} {body}: {problem}"
                );
                assert!(
                    problem["detail"].as_str().unwrap().contains("U+0000"),
                    "{problem}"
                );
            }
        }
        assert!(app.redis_copy(collection, "nul").await.is_none());
        assert!(app.postgres_copy(collection, "nul").await.is_none());
    }
    for collection in ["accounts", "groups"] {
        let read: Value = app.get(collection, "g").await.json().await.unwrap();
        assert_eq!(read["data"], json!({"n": 1}), "the patches wrote nothing");
    }
}

/// A version above what PostgreSQL and SQLite store (signed 64-bit) was
/// never issued: `If-Match` with one is malformed input, in both modes, on
/// an existing record or a missing one, and nothing changes.
#[tokio::test]
async fn an_if_match_beyond_every_tiers_range_is_refused_in_both_modes() {
    for app in [
        TestApp::builder().spawn().await,
        TestApp::builder().embedded().spawn().await,
    ] {
        let created = app.put("accounts", "a", json!({"n": 1})).await;
        assert_eq!(created.status(), StatusCode::CREATED);
        let version = hybridstore_testkit::etag_version(&created);
        for tag in ["\"9223372036854775808\"", "\"18446744073709551615\""] {
            for (method, id) in [
                (Method::PUT, "a"),
                (Method::DELETE, "a"),
                (Method::PATCH, "a"),
                (Method::PUT, "missing"),
                (Method::DELETE, "missing"),
            ] {
                let what = format!(
                    "{method} {id} If-Match {tag} (embedded: {})",
                    app.is_embedded()
                );
                check(
                    &app,
                    Case {
                        what: Box::leak(what.into_boxed_str()),
                        method,
                        path: format!("/v1/collections/accounts/records/{id}"),
                        token: Some(ADMIN_TOKEN),
                        content_type: Some("application/json"),
                        body: br#"{"n": 2}"#.to_vec(),
                        headers: vec![("if-match", tag)],
                        status: StatusCode::BAD_REQUEST,
                        code: "invalid_request",
                    },
                )
                .await;
            }
        }
        let kept = app.get("accounts", "a").await;
        assert_eq!(
            hybridstore_testkit::etag_version(&kept),
            version,
            "unchanged"
        );
        assert_eq!(
            app.get("accounts", "missing").await.status(),
            StatusCode::NOT_FOUND
        );
    }
}
