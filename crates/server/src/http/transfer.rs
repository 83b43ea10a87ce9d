//! `GET /admin/database/export` and `POST /admin/database/import`: every
//! record and counter as NDJSON lines (format in `hybridstore-transfer`).
//!
//! Export streams page by page from the durable tier; if it fails midway the
//! response is cut off without its `end` line, which every reader refuses.
//! Import takes a body of any size: it is spooled to a temporary file,
//! checked completely (header, every line, collections declared, the end
//! line's counts), and only then applied in batches, so a malformed file
//! writes nothing.

use std::io::{BufReader, Seek};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use hybridstore_core::Error;
use hybridstore_engine::ImportReport;
use hybridstore_transfer::{Counts, Line, encode_line, parse_line, read_export};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::extract::{AdminCaller, ApiQuery};
use super::problem::ApiError;
use super::{AppState, openapi};

/// Lines applied per durable transaction.
const IMPORT_BATCH: usize = 500;

#[utoipa::path(get, path = "/admin/database/export", tag = "admin", summary = "Every record and counter as NDJSON (streamed from the durable tier)",
    responses((status = 200, description = "NDJSON lines: header, record/deletion/counter lines, end", content_type = "application/x-ndjson", body = String), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn export(State(state): State<AppState>, _: AdminCaller) -> Response {
    let pages = state.engine.clone().export().map_ok(|lines| {
        let mut bytes = Vec::new();
        for line in &lines {
            bytes.extend(encode_line(line));
        }
        Bytes::from(bytes)
    });
    // A failure half-way ends the stream with a `failed` line (no importer
    // takes it), rather than cutting the body: the client learns why.
    let body = pages.scan(false, |failed, page| {
        let next = match (*failed, page) {
            (true, _) => None,
            (false, Ok(bytes)) => Some(bytes),
            (false, Err(err)) => {
                tracing::error!(error = %err, "export stopped");
                *failed = true;
                Some(Bytes::from(hybridstore_transfer::failed_line(
                    &err.to_string(),
                )))
            }
        };
        std::future::ready(next)
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body.map(Ok::<_, std::convert::Infallible>)),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    #[serde(default)]
    force: bool,
}

fn spool_failed(err: std::io::Error) -> ApiError {
    tracing::error!(error = %err, "cannot spool an import");
    Error::Internal(format!("spooling the import: {err}")).into()
}

#[utoipa::path(post, path = "/admin/database/import", tag = "admin", summary = "Upsert an export's records and counters, version-guarded",
    params(("force" = Option<bool>, Query, description = "Overwrite newer versions and held counter values")),
    request_body(content = String, content_type = "application/x-ndjson", description = "An export (as `GET /admin/database/export` writes it)"),
    responses((status = 200, description = "What was read, applied and skipped", body = hybridstore_api::ImportAnswer), (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn import(
    State(state): State<AppState>,
    _: AdminCaller,
    ApiQuery(params): ApiQuery<ImportParams>,
    body: Body,
) -> Result<Response, ApiError> {
    // 1. Spool: the body may be far larger than memory should hold.
    let spool = tempfile::tempfile().map_err(spool_failed)?;
    let mut file = tokio::fs::File::from_std(spool);
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|err| Error::InvalidRequest(format!("the body broke off: {err}")))?;
        file.write_all(&chunk).await.map_err(spool_failed)?;
    }
    file.flush().await.map_err(spool_failed)?;
    let mut spool = file.into_std().await;

    // 2. Check everything before writing anything.
    spool.rewind().map_err(spool_failed)?;
    let engine = state.engine.clone();
    let (checked, spool) = tokio::task::spawn_blocking(move || {
        let mut first_problem = None;
        let result = read_export(BufReader::new(&spool), |line| {
            if first_problem.is_none()
                && let Err(problem) = engine.check_import_line(&line)
            {
                first_problem = Some(problem);
            }
            Ok(())
        });
        let checked = match (result, first_problem) {
            (Err(err), _) => Err(err.to_string()),
            (Ok(_), Some(problem)) => Err(problem),
            (Ok((_, counts)), None) => Ok(counts),
        };
        (checked, spool)
    })
    .await
    .map_err(|err| Error::Internal(err.to_string()))?;
    let counts: Counts = checked.map_err(Error::InvalidRequest)?;

    // 3. Apply in batches.
    let mut spool = spool;
    spool.rewind().map_err(spool_failed)?;
    let file = tokio::fs::File::from_std(spool);
    let mut lines = tokio::io::BufReader::new(file).lines();
    let mut report = ImportReport::default();
    let mut batch = Vec::with_capacity(IMPORT_BATCH);
    let mut number = 0;
    while let Some(text) = lines.next_line().await.map_err(spool_failed)? {
        number += 1;
        let line = parse_line(&text, number)
            .map_err(|err| Error::Internal(format!("the checked import changed: {err}")))?;
        if matches!(line, Line::Header(_) | Line::End(_)) {
            continue;
        }
        batch.push(line);
        if batch.len() == IMPORT_BATCH {
            let lines = std::mem::take(&mut batch);
            state
                .engine
                .import_batch(lines, params.force, &mut report)
                .await?;
        }
    }
    state
        .engine
        .import_batch(batch, params.force, &mut report)
        .await?;
    tracing::info!(
        records = counts.total_records(),
        counters = counts.counters,
        force = params.force,
        "import applied"
    );
    Ok(Json(hybridstore_api::ImportAnswer {
        read: counts,
        report,
    })
    .into_response())
}
