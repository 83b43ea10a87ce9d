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
    pub fn new(openapi: &utoipa::openapi::OpenApi) -> Self {
        let json = openapi
            .to_pretty_json()
            .expect("the generated document serializes");
        Self {
            json: Arc::new(json),
            page: Arc::new(docs_page(openapi)),
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
