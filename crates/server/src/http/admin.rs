//! `/admin/database/*`: what operators see and steer (SPEC section 6).
//! Every route needs the admin token. Long work (sync, checks) runs as a job
//! whose progress `GET /admin/database/jobs/{id}` reports.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hybridstore_api::JobList;
use hybridstore_core::{CollectionName, Error, Strategy};
use hybridstore_engine::{JobView, Overall, SyncDirection};
use serde::Deserialize;

use super::extract::{AdminCaller, ApiQuery};
use super::problem::ApiError;
use super::{AppState, openapi};

/// Healthy and degraded answer 200 (the service serves); down answers 503.
#[utoipa::path(get, path = "/admin/database/health", tag = "admin", summary = "Tier health (200 healthy or degraded, 503 down)",
    responses((status = 200, description = "Healthy or degraded", body = hybridstore_api::HealthReport), (status = 503, description = "Both tiers down", body = hybridstore_api::HealthReport), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn health(State(state): State<AppState>, _: AdminCaller) -> Response {
    let report = state.engine.health_report();
    let status = match report.status {
        Overall::Down => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    (status, Json(report)).into_response()
}

#[utoipa::path(get, path = "/admin/database/status", tag = "admin", summary = "Strategies, tiers, journal backlog, cache generation, instance",
    responses((status = 200, description = "Status", body = hybridstore_api::StatusReport), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn status(State(state): State<AppState>, _: AdminCaller) -> Response {
    Json(state.engine.status_report().await).into_response()
}

#[utoipa::path(get, path = "/admin/database/metrics", tag = "admin", summary = "Operation counts, hit rate, error rate, tier latency",
    responses((status = 200, description = "Metrics", body = hybridstore_api::MetricsReport), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
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

#[utoipa::path(post, path = "/admin/database/sync/redis-to-postgres", tag = "admin", summary = "Start a Redis to PostgreSQL sync job",
    params(("force" = Option<bool>, Query, description = "Let older versions win"), ("collection" = Option<String>, Query, description = "Only this collection")),
    responses((status = 202, description = "The job (follow Location)", body = hybridstore_api::JobView), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn sync_redis_to_postgres(
    State(state): State<AppState>,
    _: AdminCaller,
    ApiQuery(params): ApiQuery<SyncParams>,
) -> Result<Response, ApiError> {
    start_sync(state, SyncDirection::RedisToPostgres, params).await
}

#[utoipa::path(post, path = "/admin/database/sync/postgres-to-redis", tag = "admin", summary = "Start a PostgreSQL to Redis sync job",
    params(("force" = Option<bool>, Query, description = "Let older versions win"), ("collection" = Option<String>, Query, description = "Only this collection")),
    responses((status = 202, description = "The job (follow Location)", body = hybridstore_api::JobView), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
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
#[utoipa::path(get, path = "/admin/database/consistency-check", tag = "admin", summary = "Compare the tiers (and repair) to the end",
    params(("repair" = Option<bool>, Query, description = "Make the tiers agree"), ("collection" = Option<String>, Query, description = "Only this collection")),
    responses((status = 200, description = "The report", body = hybridstore_api::ConsistencyReport), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
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
#[utoipa::path(post, path = "/admin/database/consistency-check", tag = "admin", summary = "Start a consistency check job",
    params(("repair" = Option<bool>, Query, description = "Make the tiers agree"), ("collection" = Option<String>, Query, description = "Only this collection")),
    responses((status = 202, description = "The job (follow Location)", body = hybridstore_api::JobView), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
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

#[utoipa::path(get, path = "/admin/database/jobs", tag = "admin", summary = "Jobs of this instance",
    responses((status = 200, description = "Jobs of this instance, newest first", body = hybridstore_api::JobList), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn jobs(State(state): State<AppState>, _: AdminCaller) -> Response {
    Json(JobList {
        jobs: state.engine.jobs(),
    })
    .into_response()
}

#[utoipa::path(get, path = "/admin/database/jobs/{id}", tag = "admin", summary = "One job and its progress",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The job", body = hybridstore_api::JobView), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
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

#[utoipa::path(post, path = "/admin/database/strategy/{name}", tag = "admin", summary = "Switch the service-wide strategy on every instance",
    params(("name" = String, Path, description = "dual-write, cache-first, database-first, redis-only, postgres-only"), ("force" = Option<bool>, Query, description = "Allow switches that change which tier holds the truth")),
    responses((status = 200, description = "The switch", body = hybridstore_api::SwitchOutcome), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
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

#[utoipa::path(post, path = "/admin/database/collections/{collection}/strategy/{name}", tag = "admin", summary = "Switch one collection's strategy on every instance",
    params(("collection" = String, Path, description = "Collection name"), ("name" = String, Path, description = "dual-write, cache-first, database-first, redis-only, postgres-only; or `service`: back to what the collection declares or follows"), ("force" = Option<bool>, Query, description = "Allow switches that change which tier holds the truth")),
    responses((status = 200, description = "The switch", body = hybridstore_api::SwitchOutcome), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn switch_collection_strategy(
    State(state): State<AppState>,
    _: AdminCaller,
    Path((collection, name)): Path<(String, String)>,
    ApiQuery(params): ApiQuery<SwitchParams>,
) -> Result<Response, ApiError> {
    let collection = CollectionName::parse(&collection).map_err(Error::InvalidName)?;
    let target = match name.as_str() {
        "service" => None,
        name => Some(name.parse::<Strategy>().map_err(Error::InvalidRequest)?),
    };
    let outcome = state
        .engine
        .switch_collection_strategy(&collection, target, params.force)
        .await?;
    Ok(Json(outcome).into_response())
}
