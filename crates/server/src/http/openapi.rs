//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! annotations: the router is built from the same annotations
//! (`utoipa_axum::routes!`), so a route cannot exist without its entry.
//! `/openapi.json` serves the document; `/docs` is a page rendered from it on
//! the server (no script, no CDN: it works offline), linking to the JSON.

use std::fmt::Write;
use std::sync::Arc;

use axum::Extension;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// A record as the API returns it.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct RecordDoc {
    collection: String,
    id: String,
    /// Totally orders the writes of this record; also its ETag.
    version: u64,
    #[schema(value_type = Object)]
    data: serde_json::Value,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

/// An RFC 9457 problem document (`application/problem+json`).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ProblemDoc {
    #[serde(rename = "type")]
    kind: String,
    title: String,
    status: u16,
    detail: String,
    /// Stable: clients branch on it.
    code: String,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ListPageDoc {
    records: Vec<RecordDoc>,
    /// Pass as `after=` for the next page; null on the last.
    next: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct BatchGetRequestDoc {
    ids: Vec<String>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct BatchGetDoc {
    records: Vec<RecordDoc>,
    missing: Vec<String>,
    /// Ids not read because the answer was full (`limits.page_bytes` of
    /// record data); ask for them again.
    unread: Vec<String>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hybridstore",
        description = "Hybrid Redis + PostgreSQL data service: records with versions, strategies, \
                       degradation, and the operator API. Errors are application/problem+json with a \
                       stable `code`.",
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(RecordDoc, ProblemDoc, ListPageDoc, BatchGetRequestDoc, BatchGetDoc)),
    tags(
        (name = "records", description = "Collections and records"),
        (name = "counters", description = "Usage counters in time buckets"),
        (name = "admin", description = "Operator API (admin token)"),
        (name = "operations", description = "Probes, metrics and this document (no token)"),
    )
)]
pub struct ApiDoc;

/// The finished document, shared with the handlers that serve it.
#[derive(Clone)]
pub struct Spec {
    pub json: Arc<String>,
    pub page: Arc<String>,
}

impl Spec {
    /// The document of this server: the annotations' paths, tightened with
    /// what the annotations cannot say (see [`tighten`]).
    pub fn new(openapi: &utoipa::openapi::OpenApi, facts: &Facts) -> Self {
        let mut document =
            serde_json::to_value(openapi).expect("the generated document serializes");
        tighten(&mut document, facts);
        let json = serde_json::to_string_pretty(&document).expect("a JSON value serializes");
        Self {
            json: Arc::new(json),
            page: Arc::new(docs_page(openapi)),
        }
    }
}

/// What the document says about this deployment: its collections and the
/// unique indexes they declare.
pub struct Facts {
    pub collections: Vec<String>,
    pub indexes: Vec<String>,
}

impl Facts {
    pub fn of(catalog: &hybridstore_engine::Catalog) -> Self {
        let mut indexes: Vec<String> = catalog
            .iter()
            .flat_map(|c| c.spec.unique_indexes.iter().map(|i| i.to_string()))
            .collect();
        indexes.sort();
        indexes.dedup();
        Self {
            collections: catalog.iter().map(|c| c.spec.name.to_string()).collect(),
            indexes,
        }
    }
}

/// Every parameter and body as precisely as the server checks it (the rules
/// come from core: names, ids, limits), every operation a unique id, and
/// links from a write to the reads of what it wrote, for clients and for
/// stateful testing (schemathesis runs over this document in CI).
fn tighten(document: &mut Value, facts: &Facts) {
    use hybridstore_core::{ID_PATTERN, ID_PREFIX_PATTERN, MAX_DELTA_UNITS, NAME_PATTERN};
    let version_tag = r#"^"[0-9]{1,19}"$"#;
    let parameter = |name: &str, location: &str| -> Option<Value> {
        Some(match (name, location) {
            ("collection", _) => json!({"type": "string", "enum": facts.collections}),
            ("id", "path") | ("after", "query") => json!({"type": "string", "pattern": ID_PATTERN}),
            ("scope", "path") => json!({"type": "string", "pattern": ID_PATTERN}),
            ("prefix", "query") => json!({"type": "string", "pattern": ID_PREFIX_PATTERN}),
            ("index", "path") => json!({"type": "string", "enum": facts.indexes}),
            ("value", "path") => json!({"type": "string", "minLength": 1}),
            ("limit", "query") => json!({"type": "integer", "minimum": 1, "maximum": 1000}),
            ("ttl", "query") => {
                json!({"type": "integer", "minimum": 1, "maximum": hybridstore_core::MAX_TTL_SECS})
            }
            ("granularity", "query") => {
                json!({"type": "string", "enum": ["total", "hour", "day", "month"]})
            }
            ("from" | "to", "query") => json!({"type": "string", "format": "date-time"}),
            ("force" | "repair", "query") => json!({"type": "boolean"}),
            ("name", "path") => json!({"type": "string", "enum": [
                "dual-write", "cache-first", "database-first", "redis-only", "postgres-only"]}),
            ("If-Match", "header") => {
                json!({"type": "string", "pattern": format!(r#"^(\*|{})$"#, &version_tag[1..version_tag.len() - 1])})
            }
            _ => return None,
        })
    };
    // Any JSON a record can hold: strings and names without U+0000 (the
    // durable tier cannot store it).
    let no_nul = r"^[^\u0000]*$";
    let schemas = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
        .expect("the document has schemas");
    schemas.insert(
        "JsonValue".into(),
        json!({"anyOf": [
            {"type": "null"}, {"type": "boolean"}, {"type": "number"},
            {"type": "string", "pattern": no_nul},
            {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
            {"$ref": "#/components/schemas/RecordData"},
        ]}),
    );
    schemas.insert(
        "RecordData".into(),
        json!({"type": "object", "propertyNames": {"pattern": no_nul},
               "additionalProperties": {"$ref": "#/components/schemas/JsonValue"}}),
    );
    let max_delta = MAX_DELTA_UNITS as i64;
    let bodies: [(&str, Value); 4] = [
        ("put", json!({"$ref": "#/components/schemas/RecordData"})),
        ("patch", json!({"$ref": "#/components/schemas/RecordData"})),
        (
            "increment",
            json!({
            "type": "object", "required": ["deltas"], "additionalProperties": false,
            "properties": {
                "deltas": {"type": "object", "minProperties": 1, "maxProperties": 32,
                    "propertyNames": {"pattern": NAME_PATTERN},
                    "additionalProperties": {"type": "number",
                        "minimum": -max_delta, "maximum": max_delta,
                        "description": "An exact decimal with at most 9 decimals"}},
                "at": {"type": ["string", "null"], "format": "date-time",
                    "description": "When it happened (default now; not in the future)"}
            }}),
        ),
        (
            "batch_get",
            json!({
            "type": "object", "required": ["ids"], "additionalProperties": false,
            "properties": {"ids": {"type": "array", "maxItems": 1000,
                "items": {"type": "string", "pattern": ID_PATTERN}}}}),
        ),
    ];
    let record_links = json!({
        "GetRecord": {"operationId": "get", "parameters": {
            "collection": "$request.path.collection", "id": "$request.path.id"}},
        "PatchRecord": {"operationId": "patch", "parameters": {
            "collection": "$request.path.collection", "id": "$request.path.id"}},
        "DeleteRecord": {"operationId": "delete", "parameters": {
            "collection": "$request.path.collection", "id": "$request.path.id"}},
    });
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in item.iter_mut() {
            let Some(operation) = operation.as_object_mut() else {
                continue;
            };
            // `health` and `metrics` exist twice (probe and admin API).
            if path.starts_with("/admin/")
                && let Some(Value::String(id)) = operation.get_mut("operationId")
            {
                *id = format!("admin_{id}");
            }
            let id = operation
                .get("operationId")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if let Some(Value::Array(parameters)) = operation.get_mut("parameters") {
                for parameter_doc in parameters.iter_mut() {
                    let name = parameter_doc["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let location = parameter_doc["in"].as_str().unwrap_or_default().to_owned();
                    let schema = match (name.as_str(), location.as_str(), method.as_str()) {
                        ("If-None-Match", "header", "put") => {
                            Some(json!({"type": "string", "enum": ["*"]}))
                        }
                        ("If-None-Match", "header", _) => Some(json!({"type": "string",
                            "pattern": r#"^(\*|(W/)?"[0-9]{1,19}"( *, *(W/)?"[0-9]{1,19}")*)$"#})),
                        _ => parameter(&name, &location),
                    };
                    if let Some(schema) = schema {
                        parameter_doc["schema"] = schema;
                    }
                }
            }
            if let Some((_, body)) = bodies.iter().find(|(op, _)| *op == id)
                && let Some(Value::Object(content)) = operation
                    .get_mut("requestBody")
                    .and_then(|b| b.get_mut("content"))
            {
                for media in content.values_mut() {
                    media["schema"] = body.clone();
                }
            }
            if id == "put"
                && let Some(Value::Object(responses)) = operation.get_mut("responses")
            {
                for status in ["200", "201"] {
                    if let Some(response) = responses.get_mut(status) {
                        response["links"] = record_links.clone();
                    }
                }
            }
            if id == "increment"
                && let Some(response) = operation
                    .get_mut("responses")
                    .and_then(|responses| responses.get_mut("200"))
            {
                response["links"] = json!({"ReadCounters": {"operationId": "read",
                    "parameters": {"scope": "$request.path.scope"}}});
            }
        }
    }
}

/// The operations of the document as an HTML page.
fn docs_page(openapi: &utoipa::openapi::OpenApi) -> String {
    let escape = |text: &str| {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut rows = String::new();
    for (path, item) in &openapi.paths.paths {
        let operations = [
            ("GET", &item.get),
            ("PUT", &item.put),
            ("POST", &item.post),
            ("PATCH", &item.patch),
            ("DELETE", &item.delete),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation else { continue };
            let summary = operation.summary.as_deref().unwrap_or("");
            let _ = write!(
                rows,
                "<tr><td><code>{method}</code></td><td><code>{}</code></td><td>{}</td></tr>",
                escape(path),
                escape(summary)
            );
        }
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>hybridstore API</title>\
         <style>body{{font-family:sans-serif;margin:2em}}td{{padding:.2em .8em}}</style></head>\
         <body><h1>hybridstore API {}</h1><p>The full OpenAPI 3.1 document: \
         <a href=\"/openapi.json\">/openapi.json</a> (load it into any OpenAPI viewer).</p>\
         <table>{rows}</table></body></html>",
        escape(&openapi.info.version)
    )
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json(Extension(spec): Extension<Spec>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        spec.json.as_str().to_owned(),
    )
        .into_response()
}

/// A page listing every operation, with a link to the document.
#[utoipa::path(get, path = "/docs", tag = "operations", security(()),
    responses((status = 200, description = "HTML", content_type = "text/html")))]
pub async fn docs(Extension(spec): Extension<Spec>) -> Html<String> {
    Html(spec.page.as_str().to_owned())
}
