//! Record endpoints: parse, authorise, call the engine, shape the response.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header::ETAG;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hybridstore_core::{
    CollectionName, CollectionSpec, Error, MAX_TTL_SECS, Record, RecordId, Strategy,
    validate_id_prefix,
};
use serde::{Deserialize, Serialize};

use super::conditional::{etag, not_modified, write_precondition};
use super::extract::{ApiQuery, Caller, CollectionPath, JsonBody, LookupPath, RecordPath};
use super::problem::ApiError;
use super::{AppState, openapi};
use crate::auth::Access;

/// Most records one list page or batch get returns.
const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

/// Checks the caller's scope, then that the collection exists (in that order,
/// so a caller without access cannot probe which collections exist).
fn authorize(
    state: &AppState,
    caller: &Caller,
    access: Access,
    collection: &CollectionName,
) -> Result<(), ApiError> {
    let private = state
        .engine
        .catalog()
        .get(collection)
        .is_ok_and(|c| c.spec.private);
    if !caller.0.may(access, collection, private) {
        let verb = match access {
            Access::Read => "read",
            Access::Write => "write",
        };
        return Err(ApiError::Forbidden(format!(
            "this token lacks the scope {verb}:{collection}"
        )));
    }
    state.engine.catalog().get(collection)?;
    Ok(())
}

fn record_response(status: StatusCode, record: &Record) -> Response {
    (status, [(ETAG, etag(record.version))], Json(record)).into_response()
}

/// A list or batch-get answer, written off the runtime: a page holds up to
/// `limits.page_bytes` of data, milliseconds of work.
async fn many_response<T: Serialize + Send + 'static>(answer: T) -> Result<Response, ApiError> {
    let body = super::offload(usize::MAX, move || serde_json::to_vec(&answer))
        .await
        .map_err(|err| Error::Internal(format!("answer not written: {err}")))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

#[derive(Serialize)]
struct CollectionView<'a> {
    #[serde(flatten)]
    spec: &'a CollectionSpec,
    /// The strategy in force (the collection's own or the global one).
    effective_strategy: Strategy,
}

#[utoipa::path(get, path = "/v1/collections", tag = "records", summary = "Declared collections and their policies",
    responses((status = 200, description = "Declared collections and their policies", body = openapi::CollectionsDoc), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn list_collections(State(state): State<AppState>, _caller: Caller) -> Response {
    let collections: Vec<CollectionView> = state
        .engine
        .catalog()
        .iter()
        .map(|collection| CollectionView {
            spec: &collection.spec,
            effective_strategy: state.engine.strategy_of(collection),
        })
        .collect();
    Json(serde_json::json!({ "collections": collections })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutParams {
    ttl: Option<u64>,
}

fn ttl_param(ttl: Option<u64>) -> Result<Option<Duration>, ApiError> {
    match ttl {
        None => Ok(None),
        Some(secs) if (1..=MAX_TTL_SECS).contains(&secs) => Ok(Some(Duration::from_secs(secs))),
        Some(_) => Err(Error::InvalidRequest(format!(
            "ttl must be between 1 and {MAX_TTL_SECS} seconds"
        ))
        .into()),
    }
}

#[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
#[utoipa::path(put, path = "/v1/collections/{collection}/records/{id}", tag = "records", summary = "Create or replace a record",
    params(("collection" = String, Path, description = "Collection name"), ("id" = String, Path, description = "Record id"), ("ttl" = Option<u64>, Query, description = "Lifetime in seconds"),
        ("If-Match" = Option<String>, Header, description = "Write only at this version (\"*\": only if it exists)"),
        ("If-None-Match" = Option<String>, Header, description = "`*`: create only")),
    request_body(content = Object, description = "The record's data (a JSON object)"),
    responses((status = 201, description = "Created", body = openapi::RecordDoc), (status = 200, description = "Replaced", body = openapi::RecordDoc), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    RecordPath(key): RecordPath,
    ApiQuery(params): ApiQuery<PutParams>,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    authorize(&state, &caller, Access::Write, &key.collection)?;
    let precondition = write_precondition(&headers)?;
    let ttl = ttl_param(params.ttl)?;
    let data = body.object().await?;
    let outcome = state.engine.put(key, data, precondition, ttl).await?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(record_response(status, &outcome.record))
}

#[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
#[utoipa::path(patch, path = "/v1/collections/{collection}/records/{id}", tag = "records", summary = "Apply a JSON Merge Patch (RFC 7396)",
    params(("collection" = String, Path, description = "Collection name"), ("id" = String, Path, description = "Record id"), ("If-Match" = Option<String>, Header, description = "Only at this version")),
    request_body(content = Object, content_type = "application/merge-patch+json"),
    responses((status = 200, description = "Patched", body = openapi::RecordDoc), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    RecordPath(key): RecordPath,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    authorize(&state, &caller, Access::Write, &key.collection)?;
    let precondition = write_precondition(&headers)?;
    let patch = body.object().await?;
    let outcome = state.engine.patch(key, patch, precondition).await?;
    Ok(record_response(StatusCode::OK, &outcome.record))
}

#[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
#[utoipa::path(get, path = "/v1/collections/{collection}/records/{id}", tag = "records", summary = "Read a record",
    params(("collection" = String, Path, description = "Collection name"), ("id" = String, Path, description = "Record id"), ("If-None-Match" = Option<String>, Header, description = "304 when the version is unchanged")),
    responses((status = 200, description = "The record; ETag is its version", body = openapi::RecordDoc), (status = 304, description = "Not modified"), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    RecordPath(key): RecordPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &caller, Access::Read, &key.collection)?;
    let record = state
        .engine
        .get(&key)
        .await?
        .ok_or_else(|| Error::NotFound("record not found".into()))?;
    if not_modified(&headers, record.version)? {
        return Ok((StatusCode::NOT_MODIFIED, [(ETAG, etag(record.version))]).into_response());
    }
    Ok(record_response(StatusCode::OK, &record))
}

#[tracing::instrument(level = "debug", skip_all, fields(collection = %key.collection, id = %key.id))]
#[utoipa::path(delete, path = "/v1/collections/{collection}/records/{id}", tag = "records", summary = "Delete a record",
    params(("collection" = String, Path, description = "Collection name"), ("id" = String, Path, description = "Record id"), ("If-Match" = Option<String>, Header, description = "Only at this version")),
    responses((status = 204, description = "Deleted"), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    RecordPath(key): RecordPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &caller, Access::Write, &key.collection)?;
    let precondition = write_precondition(&headers)?;
    state.engine.delete(&key, precondition).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    after: Option<String>,
    limit: Option<u32>,
    prefix: Option<String>,
}

#[derive(Serialize)]
struct ListPage {
    records: Vec<Record>,
    /// Pass as `after=` for the next page; `null` on the last page.
    next: Option<RecordId>,
}

#[tracing::instrument(skip_all, fields(%collection))]
#[utoipa::path(get, path = "/v1/collections/{collection}/records", tag = "records", summary = "List records by id (keyset pagination)",
    params(("collection" = String, Path, description = "Collection name"), ("after" = Option<String>, Query, description = "The previous page's `next`"),
        ("limit" = Option<u32>, Query, description = "1..=1000, default 100"), ("prefix" = Option<String>, Query, description = "Only ids starting with this")),
    responses((status = 200, description = "One page", body = openapi::ListPageDoc), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    CollectionPath(collection): CollectionPath,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Response, ApiError> {
    authorize(&state, &caller, Access::Read, &collection)?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(
            Error::InvalidRequest(format!("limit must be between 1 and {MAX_PAGE}")).into(),
        );
    }
    let after = params
        .after
        .as_deref()
        .map(RecordId::parse)
        .transpose()
        .map_err(Error::from)?;
    if let Some(prefix) = &params.prefix {
        validate_id_prefix(prefix).map_err(Error::from)?;
    }
    let page = state
        .engine
        .list(&collection, after, params.prefix, limit)
        .await?;
    many_response(ListPage {
        records: page.records,
        next: page.next,
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchGetRequest {
    ids: Vec<String>,
}

#[derive(Serialize)]
struct BatchGetResponse {
    records: Vec<Record>,
    missing: Vec<RecordId>,
    /// Ids not read: the answer was full (`limits.page_bytes` of data).
    unread: Vec<RecordId>,
}

#[tracing::instrument(skip_all, fields(%collection))]
#[utoipa::path(post, path = "/v1/collections/{collection}/batch-get", tag = "records", summary = "Read several records at once",
    params(("collection" = String, Path, description = "Collection name")), request_body = openapi::BatchGetRequestDoc,
    responses((status = 200, description = "Found records and missing ids", body = openapi::BatchGetDoc), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn batch_get(
    State(state): State<AppState>,
    caller: Caller,
    CollectionPath(collection): CollectionPath,
    body: JsonBody,
) -> Result<Response, ApiError> {
    authorize(&state, &caller, Access::Read, &collection)?;
    let request: BatchGetRequest = body.parse()?;
    if request.ids.len() > MAX_PAGE as usize {
        return Err(Error::InvalidRequest(format!("at most {MAX_PAGE} ids per batch")).into());
    }
    let ids = request
        .ids
        .iter()
        .map(|id| RecordId::parse(id))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::from)?;
    let found = state.engine.batch_get(&collection, ids).await?;
    many_response(BatchGetResponse {
        records: found.records,
        missing: found.missing,
        unread: found.unread,
    })
    .await
}

#[tracing::instrument(skip_all, fields(collection = %path.collection, index = %path.index))]
#[utoipa::path(get, path = "/v1/collections/{collection}/lookup/{index}/{value}", tag = "records", summary = "The record whose unique index holds a value",
    params(("collection" = String, Path, description = "Collection name"), ("index" = String, Path, description = "Unique index name"), ("value" = String, Path, description = "Indexed value")),
    responses((status = 200, description = "The record", body = openapi::RecordDoc), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn lookup(
    State(state): State<AppState>,
    caller: Caller,
    path: LookupPath,
) -> Result<Response, ApiError> {
    authorize(&state, &caller, Access::Read, &path.collection)?;
    let record = state
        .engine
        .lookup(&path.collection, &path.index, &path.value)
        .await?
        .ok_or_else(|| Error::NotFound("no record holds this value".into()))?;
    Ok(record_response(StatusCode::OK, &record))
}
