//! The OpenAPI document: valid 3.1, and in step with the router.

use hybridstore_testkit::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Every route of SPEC sections 3 and 6 and the operations endpoints.
const EXPECTED: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/docs"),
    ("get", "/v1/collections"),
    ("get", "/v1/collections/{collection}/records"),
    ("put", "/v1/collections/{collection}/records/{id}"),
    ("patch", "/v1/collections/{collection}/records/{id}"),
    ("get", "/v1/collections/{collection}/records/{id}"),
    ("delete", "/v1/collections/{collection}/records/{id}"),
    ("post", "/v1/collections/{collection}/batch-get"),
    ("get", "/v1/collections/{collection}/lookup/{index}/{value}"),
    ("get", "/admin/database/health"),
    ("get", "/admin/database/status"),
    ("get", "/admin/database/metrics"),
    ("post", "/admin/database/sync/redis-to-postgres"),
    ("post", "/admin/database/sync/postgres-to-redis"),
    ("get", "/admin/database/consistency-check"),
    ("post", "/admin/database/consistency-check"),
    ("get", "/admin/database/jobs"),
    ("get", "/admin/database/jobs/{id}"),
    ("post", "/admin/database/strategy/{name}"),
    (
        "post",
        "/admin/database/collections/{collection}/strategy/{name}",
    ),
];

/// Every `"$ref"` string in a JSON document.
fn refs(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item) {
                    ("$ref", Value::String(target)) => found.push(target.clone()),
                    _ => refs(item, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| refs(item, found)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_is_valid_openapi_3_1_and_lists_every_route() {
    let app = TestApp::builder().spawn().await;
    let response = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "served without a token");
    let text = response.text().await.unwrap();
    let parsed = oas3::from_json(&text).expect("a valid OpenAPI 3.1 document");
    assert!(parsed.openapi.starts_with("3.1."), "{}", parsed.openapi);
    let document: Value = serde_json::from_str(&text).unwrap();

    let mut targets = Vec::new();
    refs(&document, &mut targets);
    for target in &targets {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {target}"));
        assert!(
            document["components"]["schemas"][name].is_object(),
            "{target} resolves"
        );
    }

    let paths = document["paths"].as_object().unwrap();
    let mut listed = Vec::new();
    for (path, item) in paths {
        for method in ["get", "put", "post", "patch", "delete"] {
            let Some(operation) = item.get(method) else {
                continue;
            };
            assert!(
                operation["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty()),
                "{method} {path} documents its responses"
            );
            listed.push((method.to_owned(), path.clone()));
        }
    }
    for (method, path) in EXPECTED {
        assert!(
            listed.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is missing from the document"
        );
    }

    // And the router serves every operation the document lists (no token:
    // a served route answers 401 or its answer, never "no such route").
    for (method, path) in &listed {
        let concrete = path
            .replace("{collection}", "accounts")
            .replace("{id}", "x")
            .replace("{index}", "i")
            .replace("{value}", "v")
            .replace("{name}", "dual-write");
        let method: Method = method.to_uppercase().parse().unwrap();
        let response = app
            .http
            .request(method.clone(), app.url(&concrete))
            .send()
            .await
            .unwrap();
        assert_ne!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {concrete}"
        );
        if response.status() == StatusCode::NOT_FOUND {
            let problem: Value = response.json().await.unwrap();
            assert_ne!(problem["detail"], "no such route", "{method} {concrete}");
        }
    }

    let docs = app.http.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    let page = docs.text().await.unwrap();
    assert!(page.contains("href=\"/openapi.json\""));
    for (_, path) in EXPECTED {
        assert!(page.contains(path), "{path} on the docs page");
    }
}

/// The router is built from the handlers' annotations only: a route added
/// with plain `.route(...)` would be served without being documented.
#[test]
fn every_route_comes_from_an_annotated_handler() {
    let router_source = include_str!("../../crates/server/src/http/mod.rs");
    assert!(
        !router_source.contains(".route("),
        "add routes with `.routes(routes!(handler))` and a #[utoipa::path] on the handler"
    );
}
