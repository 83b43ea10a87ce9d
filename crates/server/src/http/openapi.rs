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

/// `GET /health`.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct LivenessDoc {
    /// Always `ok`.
    status: String,
}

/// `GET /ready`: `ready` while at least one tier is usable.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ReadinessDoc {
    /// `ready` or `unavailable`.
    status: String,
    tiers: Vec<TierStateDoc>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct TierStateDoc {
    /// `durable` or `cache`.
    tier: String,
    /// `postgres`, `redis`, `sqlite` or `memory`.
    backend: String,
    state: hybridstore_api::BreakerState,
}

/// `GET /v1/collections`.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CollectionsDoc {
    collections: Vec<CollectionDoc>,
}

/// A declared collection and its policies.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CollectionDoc {
    name: String,
    /// How long the cache keeps a record after it was written or read.
    cache_ttl_secs: u64,
    /// Default lifetime of a record (`?ttl=` overrides it per write).
    record_ttl_secs: Option<u64>,
    unique_indexes: Vec<String>,
    /// The JSON Schema every record's data must satisfy (when declared).
    #[schema(value_type = Option<Object>)]
    schema: Option<serde_json::Value>,
    /// Its own strategy (when it declares one).
    strategy: Option<String>,
    /// Only scopes that name it reach it (`read:*` does not).
    private: Option<bool>,
    /// The strategy in force (its own, or the service-wide one).
    effective_strategy: String,
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
            page: Arc::new(docs_page(&document)),
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

/// The document as a page: every operation with what it takes (parameters,
/// body), what it needs (token and scope), and what it answers (each status
/// with its schema), then the error codes and the schemas. Written on the
/// server from the finished document (the same one `/openapi.json` serves),
/// with no script and no external asset: it works offline.
fn docs_page(document: &Value) -> String {
    let mut page = String::new();
    let version = document["info"]["version"].as_str().unwrap_or("");
    let _ = write!(
        page,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>hybridstore API</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:70em}}\
         td,th{{padding:.2em .8em;text-align:left;vertical-align:top}}\
         pre{{background:#f4f4f4;padding:.5em;overflow-x:auto}}\
         h3{{margin-top:2em;border-top:1px solid #ccc;padding-top:.5em}}\
         code{{background:#f4f4f4}}</style></head><body>\
         <h1>hybridstore API {}</h1>\
         <p>{}</p>\
         <p>The OpenAPI 3.1 document: <a href=\"/openapi.json\">/openapi.json</a> \
         (what this page is written from; load it into any OpenAPI tool).</p>\
         <h2>Authentication</h2>\
         <p>Send <code>Authorization: Bearer &lt;token&gt;</code>. Operations under \
         <code>/admin</code> take the admin token. Operations under <code>/v1</code> take \
         the admin token or a client token whose scopes allow them: \
         <code>read:&lt;collection&gt;</code> or <code>read:*</code> for reads, \
         <code>write:&lt;collection&gt;</code> or <code>write:*</code> for writes, \
         <code>counters</code> for counters (<code>*</code> does not reach a private \
         collection). Operations marked <em>no token</em> are open. A missing or unknown \
         token is <code>401</code>, a token without the scope <code>403</code>.</p>",
        escape(version),
        escape(document["info"]["description"].as_str().unwrap_or("")),
    );
    page.push_str(&errors_section());
    let mut index = String::new();
    let mut operations = String::new();
    for (path, item) in document["paths"].as_object().into_iter().flatten() {
        for (method, operation) in item.as_object().into_iter().flatten() {
            let id = operation["operationId"].as_str().unwrap_or(method);
            let summary = operation["summary"].as_str().unwrap_or("");
            let method = method.to_uppercase();
            let _ = write!(
                index,
                "<tr><td><code>{method}</code></td><td><a href=\"#{id}\"><code>{}</code></a></td><td>{}</td></tr>",
                escape(path),
                escape(summary)
            );
            let _ = write!(
                operations,
                "<h3 id=\"{id}\"><code>{method} {}</code></h3><p>{}</p>",
                escape(path),
                escape(summary)
            );
            if let Some(description) = operation["description"].as_str()
                && description != summary
            {
                let _ = write!(operations, "<p>{}</p>", escape(description));
            }
            let open = operation["security"].as_array().is_some_and(|schemes| {
                schemes
                    .iter()
                    .all(|s| s.as_object().is_some_and(|o| o.is_empty()))
            });
            let auth = if open {
                "no token"
            } else if path.starts_with("/admin") {
                "admin token"
            } else if path.starts_with("/v1/counters") {
                "a token with <code>counters</code> (or the admin token)"
            } else if method == "GET" || id == "batch_get" || id == "lookup" {
                "a token with <code>read:</code> the collection (or the admin token)"
            } else {
                "a token with <code>write:</code> the collection (or the admin token)"
            };
            let _ = write!(operations, "<p><b>Auth:</b> {auth}</p>");
            if let Some(parameters) = operation["parameters"].as_array() {
                operations.push_str(
                    "<p><b>Parameters</b></p><table><tr><th>name</th><th>in</th><th>required</th><th>schema</th><th>description</th></tr>",
                );
                for parameter in parameters {
                    let _ = write!(
                        operations,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                        escape(parameter["name"].as_str().unwrap_or("")),
                        escape(parameter["in"].as_str().unwrap_or("")),
                        if parameter["required"] == true {
                            "yes"
                        } else {
                            "no"
                        },
                        schema_text(&parameter["schema"]),
                        escape(parameter["description"].as_str().unwrap_or("")),
                    );
                }
                operations.push_str("</table>");
            }
            if let Some(body) = operation["requestBody"].as_object() {
                operations.push_str("<p><b>Body</b></p>");
                if let Some(description) = body.get("description").and_then(Value::as_str) {
                    let _ = write!(operations, "<p>{}</p>", escape(description));
                }
                for (media, content) in body
                    .get("content")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    let _ = write!(
                        operations,
                        "<p><code>{}</code>: <code>{}</code></p>",
                        escape(media),
                        schema_text(&content["schema"])
                    );
                }
            }
            operations.push_str(
                "<p><b>Answers</b></p><table><tr><th>status</th><th>description</th><th>body</th></tr>",
            );
            for (status, response) in operation["responses"].as_object().into_iter().flatten() {
                let bodies: Vec<String> = response["content"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(media, content)| {
                        format!(
                            "<code>{}</code> {}",
                            escape(media),
                            schema_text(&content["schema"])
                        )
                    })
                    .collect();
                let status = if status == "default" {
                    "<a href=\"#errors\">errors</a>".to_owned()
                } else {
                    escape(status)
                };
                let _ = write!(
                    operations,
                    "<tr><td>{status}</td><td>{}</td><td>{}</td></tr>",
                    escape(response["description"].as_str().unwrap_or("")),
                    bodies.join("<br>")
                );
            }
            operations.push_str("</table>");
        }
    }
    let _ = write!(
        page,
        "<h2>Operations</h2><table>{index}</table>{operations}<h2 id=\"schemas\">Schemas</h2>"
    );
    for (name, schema) in document["components"]["schemas"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let pretty = serde_json::to_string_pretty(schema).unwrap_or_default();
        let _ = write!(
            page,
            "<h3 id=\"schema-{name}\">{name}</h3><pre>{}</pre>",
            link_refs(&escape(&pretty))
        );
    }
    page.push_str("</body></html>");
    page
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A schema in one line: a reference as a link to its section, anything
/// else as compact JSON.
fn schema_text(schema: &Value) -> String {
    if schema.is_null() {
        return String::new();
    }
    link_refs(&escape(&schema.to_string()))
}

/// `#/components/schemas/X` references (already escaped) as links.
fn link_refs(text: &str) -> String {
    const REF: &str = "#/components/schemas/";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(REF) {
        out.push_str(&rest[..at]);
        let name_start = at + REF.len();
        let name_len = rest[name_start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len() - name_start);
        let name = &rest[name_start..name_start + name_len];
        let _ = write!(out, "<a href=\"#schema-{name}\">{name}</a>");
        rest = &rest[name_start + name_len..];
    }
    out.push_str(rest);
    out
}

/// Every error the API answers, from the errors themselves.
fn errors_section() -> String {
    let mut rows = String::new();
    for (status, code, title) in super::problem::catalogue() {
        let _ = write!(
            rows,
            "<tr><td>{status}</td><td><code>{code}</code></td><td>{}</td></tr>",
            escape(title)
        );
    }
    format!(
        "<h2 id=\"errors\">Errors</h2><p>Every error is an RFC 9457 problem document \
         (<code>application/problem+json</code>: <code>type</code>, <code>title</code>, \
         <code>status</code>, <code>detail</code> and a stable <code>code</code> to branch on; \
         <code>version_conflict</code> adds <code>current_version</code>, \
         <code>schema_violation</code> adds <code>errors</code>). Refused requests write nothing. \
         <code>503</code> answers carry <code>Retry-After</code>.</p>\
         <table><tr><th>status</th><th>code</th><th>title</th></tr>{rows}</table>"
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

/// The document as a page (operations, auth, errors, schemas).
#[utoipa::path(get, path = "/docs", tag = "operations", security(()),
    responses((status = 200, description = "HTML", content_type = "text/html")))]
pub async fn docs(Extension(spec): Extension<Spec>) -> Html<String> {
    Html(spec.page.as_str().to_owned())
}
