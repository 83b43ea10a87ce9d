//! `/admin/database/*`: what operators see and steer (SPEC section 6).
//! Every route needs the admin token. Long work (sync, checks) runs as a job
//! whose progress `GET /admin/database/jobs/{id}` reports.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hybridstore_core::{CollectionName, Error, Strategy};
use hybridstore_engine::{JobView, Overall, SyncDirection};
use serde::Deserialize;

use super::AppState;
use super::extract::{AdminCaller, ApiQuery};
use super::problem::ApiError;

/// Healthy and degraded answer 200 (the service serves); down answers 503.
pub async fn health(State(state): State<AppState>, _: AdminCaller) -> Response {
    let report = state.engine.health_report();
    let status = match report.status {
        Overall::Down => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    (status, Json(report)).into_response()
}

pub async fn status(State(state): State<AppState>, _: AdminCaller) -> Response {
    let mut report = serde_json::to_value(state.engine.status_report().await)
        .unwrap_or_else(|_| serde_json::json!({}));
    report["version"] = env!("CARGO_PKG_VERSION").into();
    Json(report).into_response()
}

pub async fn metrics(State(state): State<AppState>, _: AdminCaller) -> Response {
    Json(state.engine.metrics_report()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncParams {
    #[serde(default)]
    force: bool,
    collection: Option<String>,
}

fn collection_param(collection: Option<&str>) -> Result<Option<CollectionName>, ApiError> {
    collection
        .map(|name| CollectionName::parse(name).map_err(|err| Error::from(err).into()))
        .transpose()
}

/// 202 with the job and where to follow it.
fn accepted(job: JobView) -> Response {
    let location = format!("/admin/database/jobs/{}", job.id);
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(job),
    )
        .into_response()
}

async fn start_sync(
    state: AppState,
    direction: SyncDirection,
    params: SyncParams,
) -> Result<Response, ApiError> {
    let collection = collection_param(params.collection.as_deref())?;
    let job = state
        .engine
        .start_sync(direction, collection, params.force)?;
    Ok(accepted(job))
}

pub async fn sync_redis_to_postgres(
    State(state): State<AppState>,
    _: AdminCaller,
    ApiQuery(params): ApiQuery<SyncParams>,
) -> Result<Response, ApiError> {
    start_sync(state, SyncDirection::RedisToPostgres, params).await
}

pub async fn sync_postgres_to_redis(
    State(state): State<AppState>,
    _: AdminCaller,
    ApiQuery(params): ApiQuery<SyncParams>,
) -> Result<Response, ApiError> {
    start_sync(state, SyncDirection::PostgresToRedis, params).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckParams {
    #[serde(default)]
    repair: bool,
    collection: Option<String>,
}

/// Runs the check to the end and answers with its report.
pub async fn check_consistency(
    State(state): State<AppState>,
    _: AdminCaller,
    ApiQuery(params): ApiQuery<CheckParams>,
) -> Result<Response, ApiError> {
    let collection = collection_param(params.collection.as_deref())?;
    let report = state
        .engine
        .check_consistency(collection, params.repair)
        .await?;
    Ok(Json(report).into_response())
}

/// Starts the check as a job (for progress on large data sets).
pub async fn start_consistency_check(
    State(state): State<AppState>,
    _: AdminCaller,
    ApiQuery(params): ApiQuery<CheckParams>,
) -> Result<Response, ApiError> {
    let collection = collection_param(params.collection.as_deref())?;
    let job = state
        .engine
        .start_consistency_check(collection, params.repair)?;
    Ok(accepted(job))
}

pub async fn jobs(State(state): State<AppState>, _: AdminCaller) -> Response {
    Json(serde_json::json!({ "jobs": state.engine.jobs() })).into_response()
}

pub async fn job(
    State(state): State<AppState>,
    _: AdminCaller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.engine.job(&id)?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchParams {
    #[serde(default)]
    force: bool,
}

pub async fn switch_strategy(
    State(state): State<AppState>,
    _: AdminCaller,
    Path(name): Path<String>,
    ApiQuery(params): ApiQuery<SwitchParams>,
) -> Result<Response, ApiError> {
    let target: Strategy = name.parse().map_err(Error::InvalidRequest)?;
    let outcome = state.engine.switch_strategy(target, params.force).await?;
    Ok(Json(outcome).into_response())
}
