//! The OpenAPI document: valid 3.1, and in step with the router.

use hybridstore_testkit::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

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

/// A schema with `$ref`s resolved against the document.
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(target) => {
            let name = target.trim_start_matches("#/components/schemas/");
            &document["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Whether `value` has every property `schema` requires and none it does
/// not declare, all the way down through objects, arrays and `$ref`s (a
/// `oneOf` with null is its other branch; maps check their values).
fn conforms(document: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(document, schema);
    if let Some(branches) = schema["oneOf"].as_array() {
        if value.is_null() {
            return Ok(());
        }
        let other = branches
            .iter()
            .find(|b| b["type"] != "null")
            .ok_or(format!("{at}: no branch"))?;
        return conforms(document, other, value, at);
    }
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                for required in schema["required"].as_array().into_iter().flatten() {
                    let name = required.as_str().unwrap();
                    if !map.contains_key(name) {
                        return Err(format!("{at}.{name}: required, absent"));
                    }
                }
                for (name, item) in map {
                    let declared = properties
                        .get(name)
                        .ok_or(format!("{at}.{name}: not in the schema"))?;
                    conforms(document, declared, item, &format!("{at}.{name}"))?;
                }
            } else if schema["additionalProperties"].is_object() {
                for (name, item) in map {
                    conforms(
                        document,
                        &schema["additionalProperties"],
                        item,
                        &format!("{at}.{name}"),
                    )?;
                }
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                conforms(document, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Counters, admin and transfer answers are described field by field (no
/// bare `{"type": "object"}`), real answers match their descriptions, and
/// the docs page shows each operation's parameters, body, auth and answers,
/// the error codes and the schemas.
#[tokio::test]
async fn every_answer_is_described_and_the_docs_page_shows_params_bodies_auth_errors() {
    let app = TestApp::builder().spawn().await;
    let document = app.open_json("/openapi.json").await;
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                let Some(schema) = response.pointer("/content/application~1json/schema") else {
                    continue;
                };
                let schema = resolve(&document, schema);
                assert!(
                    schema["properties"].is_object()
                        || schema["items"].is_object()
                        || schema["anyOf"].is_array(),
                    "{method} {path} {status}: {schema}"
                );
            }
        }
    }

    // What the service answers matches what the document says.
    assert_eq!(
        app.increment("usage:doc", json!({"deltas": {"requests": 1}}))
            .await
            .status(),
        StatusCode::OK
    );
    for (path, operation_path) in [
        ("/admin/database/status", "/admin/database/status"),
        ("/admin/database/metrics", "/admin/database/metrics"),
        ("/admin/database/health", "/admin/database/health"),
        ("/admin/database/jobs", "/admin/database/jobs"),
        (
            "/v1/counters/usage:doc?granularity=hour",
            "/v1/counters/{scope}",
        ),
        ("/v1/collections", "/v1/collections"),
        ("/ready", "/ready"),
    ] {
        let (_, answer) = app.admin_call(Method::GET, path).await;
        let schema = &document["paths"][operation_path]["get"]["responses"]["200"]["content"]["application/json"]
            ["schema"];
        conforms(&document, schema, &answer, path).unwrap_or_else(|why| panic!("{why}: {answer}"));
    }
    // (The check can fail: an undeclared member, or a missing one.)
    let status_schema = &document["paths"]["/admin/database/status"]["get"]["responses"]["200"]["content"]
        ["application/json"]["schema"];
    assert!(conforms(&document, status_schema, &json!({"bogus": 1}), "status").is_err());
    let (_, mut status) = app.admin_call(Method::GET, "/admin/database/status").await;
    status["tiers"]["cache"]["bogus"] = json!(1);
    assert!(conforms(&document, status_schema, &status, "status").is_err());
    let increment: Value = app
        .increment("usage:doc", json!({"deltas": {"requests": 1}}))
        .await
        .json()
        .await
        .unwrap();
    let schema = &document["paths"]["/v1/counters/{scope}/increment"]["post"]["responses"]["200"]["content"]
        ["application/json"]["schema"];
    conforms(&document, schema, &increment, "increment").unwrap();

    let page = app.open_text("/docs").await;
    let increment = &page[page.find("id=\"increment\"").expect("an increment section")..];
    let increment = &increment[..increment[1..].find("<h3").unwrap_or(increment.len())];
    for needed in [
        "<b>Auth:</b> a token with <code>counters</code>",
        "<b>Parameters</b>",
        "<code>scope</code>",
        "<b>Body</b>",
        "deltas",
        "<b>Answers</b>",
        "href=\"#schema-IncrementAnswer\"",
        "href=\"#errors\"",
    ] {
        assert!(increment.contains(needed), "{needed} in {increment}");
    }
    assert!(
        page.contains("<b>Auth:</b> no token"),
        "open operations say so"
    );
    let errors = &page[page.find("id=\"errors\"").unwrap()..];
    for code in [
        "backends_unavailable",
        "version_conflict",
        "unauthorized",
        "idempotency_key_reused",
    ] {
        assert!(errors.contains(&format!("<code>{code}</code>")), "{code}");
    }
    assert!(page.contains("id=\"schema-StatusReport\""));
}
