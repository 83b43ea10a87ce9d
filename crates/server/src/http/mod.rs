//! The HTTP API (axum). Handlers are thin: extract and validate, authorise, call
//! the engine, map the result. Errors are problem+json ([`problem`]).

mod admin;
pub mod admission;
mod conditional;
mod counters;
mod extract;
mod idempotency;
pub mod openapi;
pub mod problem;
mod records;
mod transfer;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use hybridstore_engine::{BreakerState, Engine};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Authenticator;
use crate::metrics::ServerMetrics;
use extract::BodyLimit;
use problem::ApiError;

/// Work on this many bytes or more runs on the blocking pool rather than on
/// a runtime worker (see [`offload`]).
const OFFLOAD_BYTES: usize = 64 * 1024;

/// Runs CPU work over `size` bytes (parsing or writing a large body,
/// hashing it) on the blocking pool when it is large: a 1 MiB body takes
/// milliseconds, and a runtime worker held that long delays every request
/// queued behind it, `/health` included. Small work stays inline, where a
/// hand-off would cost more than it saves.
pub(crate) async fn offload<T: Send + 'static>(
    size: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    if size < OFFLOAD_BYTES {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<ServerMetrics>,
    pub admission: Arc<admission::Admission>,
}

/// The request id header, taken from the client or made up, echoed back.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The route template of a request (`/v1/collections/{collection}/...`), so
/// that metrics and logs do not grow a label per record id.
fn route_of(request: &Request) -> String {
    request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned()
}

/// Counts and times every request by method, route template and status.
async fn track_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let route = route_of(&request);
    let response = next.run(request).await;
    state.metrics.record(
        method.as_str(),
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Prometheus scrape endpoint (unauthenticated, like `/health`: expose it on
/// an internal network only).
#[utoipa::path(get, path = "/metrics", tag = "operations", summary = "Prometheus metrics", security(()),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.render(&state.engine).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "operations", summary = "Liveness", security(()),
    responses((status = 200, description = "The process answers", body = openapi::LivenessDoc)))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: at least one tier is usable (a degraded service still serves).
/// Unauthenticated, so it says only which tier is in which state; errors (which
/// may name hosts) belong to the admin status.
#[utoipa::path(get, path = "/ready", tag = "operations", summary = "Readiness: a tier is usable", security(()),
    responses((status = 200, description = "Ready", body = openapi::ReadinessDoc), (status = 503, description = "No tier usable", body = openapi::ReadinessDoc)))]
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let health = state.engine.health();
    let usable = health.iter().any(|tier| tier.state == BreakerState::Closed);
    let tiers: Vec<serde_json::Value> = health
        .iter()
        .map(|tier| serde_json::json!({ "tier": tier.tier, "backend": tier.backend, "state": tier.state }))
        .collect();
    let status = if usable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if usable { "ready" } else { "unavailable" },
        "tiers": tiers,
    });
    (status, Json(body))
}

pub fn router(state: AppState, body_limit: usize) -> Router {
    let trace = TraceLayer::new_for_http()
        .make_span_with(|request: &Request| {
            let request_id = request
                .headers()
                .get(&REQUEST_ID)
                .and_then(|id| id.to_str().ok())
                .unwrap_or("");
            tracing::info_span!(
                "request",
                method = %request.method(),
                route = %route_of(request),
                request_id,
            )
        })
        .on_response(
            DefaultOnResponse::new()
                .level(Level::INFO)
                .latency_unit(tower_http::LatencyUnit::Micros),
        );
    let (router, spec) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(openapi::docs))
        .routes(routes!(records::list_collections))
        .routes(routes!(records::list))
        .routes(routes!(
            records::put,
            records::patch,
            records::get,
            records::delete
        ))
        .routes(routes!(records::batch_get))
        .routes(routes!(records::lookup))
        .routes(routes!(counters::increment))
        .routes(routes!(counters::read))
        .routes(routes!(admin::health))
        .routes(routes!(admin::status))
        .routes(routes!(admin::metrics))
        .routes(routes!(admin::sync_redis_to_postgres))
        .routes(routes!(admin::sync_postgres_to_redis))
        .routes(routes!(
            admin::check_consistency,
            admin::start_consistency_check
        ))
        .routes(routes!(admin::jobs))
        .routes(routes!(admin::job))
        .routes(routes!(admin::switch_strategy))
        .routes(routes!(admin::switch_collection_strategy))
        .routes(routes!(transfer::export))
        .routes(routes!(transfer::import))
        .split_for_parts();
    router
        // Only on matched routes (before the fallbacks are added): an unknown
        // path or a method the path does not have answers 404 / 405,
        // whatever key it carries.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::idempotency,
        ))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(Extension(openapi::Spec::new(
            &spec,
            &openapi::Facts::of(state.engine.catalog()),
        )))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(Extension(BodyLimit(body_limit)))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            admission::admit,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            track_requests,
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(trace)
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}
