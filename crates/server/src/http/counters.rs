//! `/v1/counters/{scope}`: usage counters (SPEC sections 2 and 3). Needs the
//! `counters` scope (or the admin token).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use hybridstore_core::{Amount, CounterScope, Error, FieldName, Granularity};
use hybridstore_engine::CounterValues;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::extract::{ApiQuery, Caller, JsonBody};
use super::idempotency::IdempotencyKey;
use super::problem::ApiError;
use super::{AppState, openapi};

/// `{scope}` of the route, validated.
pub struct ScopePath(pub CounterScope);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ScopePath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let axum::extract::Path(scope): axum::extract::Path<String> =
            axum::extract::Path::from_request_parts(parts, state)
                .await
                .map_err(|rejection| Error::InvalidRequest(rejection.body_text()))?;
        Ok(ScopePath(CounterScope::parse(&scope).map_err(Error::from)?))
    }
}

fn authorize(caller: &Caller) -> Result<(), ApiError> {
    if caller.0.may_count() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "this token lacks the scope counters".into(),
        ))
    }
}

fn timestamp(name: &str, text: &str) -> Result<OffsetDateTime, ApiError> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|err| {
        Error::InvalidRequest(format!("{name} must be an RFC 3339 timestamp: {err}")).into()
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IncrementBody {
    /// Each delta as the text the client sent: a parsed JSON number would
    /// be an `f64` already (`123456789.123456789` would arrive as
    /// `123456789.12345679`).
    deltas: std::collections::BTreeMap<String, Box<RawValue>>,
    at: Option<String>,
}

/// The deltas of a body: named fields with JSON numbers, exactly.
fn deltas(
    body: std::collections::BTreeMap<String, Box<RawValue>>,
) -> Result<Vec<(FieldName, Amount)>, ApiError> {
    body.into_iter()
        .map(|(name, value)| {
            let field = FieldName::parse(&name).map_err(Error::from)?;
            let text = value.get().trim();
            if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
                return Err(
                    Error::InvalidRequest(format!("deltas.{name} must be a number")).into(),
                );
            }
            let amount = Amount::parse_decimal(text)
                .map_err(|why| Error::InvalidRequest(format!("deltas.{name}: {why}")))?;
            Ok((field, amount))
        })
        .collect()
}

/// An amount as a JSON number written with its exact decimal text
/// (`123456789.123456789`, never the nearest double): what was added from a
/// number's text reads back with every digit.
struct ExactNumber(Amount);

impl Serialize for ExactNumber {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        RawValue::from_string(self.0.to_string())
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

type Values = std::collections::BTreeMap<String, ExactNumber>;

fn values(values: &[(FieldName, Amount)]) -> Values {
    values
        .iter()
        .map(|(field, amount)| (field.to_string(), ExactNumber(*amount)))
        .collect()
}

/// One time bucket of a scope and its values.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct BucketAnswer {
    /// `total`, `hour`, `day` or `month`.
    #[schema(value_type = String)]
    granularity: Granularity,
    /// The bucket's label (`2026-11-22T05` for an hour, `total`, ...).
    bucket: String,
    #[schema(format = DateTime)]
    start: String,
    /// Field to exact decimal value (at most 9 decimals).
    #[schema(value_type = std::collections::BTreeMap<String, f64>)]
    values: Values,
}

impl From<&hybridstore_core::BucketValues> for BucketAnswer {
    fn from(held: &hybridstore_core::BucketValues) -> Self {
        Self {
            granularity: held.bucket.granularity,
            bucket: held.bucket.granularity.label(held.bucket.start),
            start: held.bucket.start.format(&Rfc3339).unwrap_or_default(),
            values: values(&held.values),
        }
    }
}

/// The values after an increment.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct IncrementAnswer {
    #[schema(value_type = String)]
    scope: CounterScope,
    /// False when part of the truth could not be read (a tier was down):
    /// the values count only what is known.
    complete: bool,
    /// The incremented fields' totals (the `total` bucket).
    #[schema(value_type = std::collections::BTreeMap<String, f64>)]
    totals: Values,
    buckets: Vec<BucketAnswer>,
}

/// The buckets of one granularity, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ReadAnswer {
    #[schema(value_type = String)]
    scope: CounterScope,
    #[schema(value_type = String)]
    granularity: Granularity,
    /// False when part of the truth could not be read (a tier was down).
    complete: bool,
    buckets: Vec<BucketAnswer>,
}

/// Adds deltas to a scope's counters, atomically, in every time bucket.
#[utoipa::path(post, path = "/v1/counters/{scope}/increment", tag = "counters",
    summary = "Add deltas to several fields at once",
    params(("scope" = String, Path, description = "Counter scope, e.g. usage:key_123:model:sonnet")),
    request_body(content = Object, description = "`{\"deltas\": {\"requests\": 1, \"cost_usd\": 0.012}, \"at\": \"2026-11-22T05:00:00Z\"}` (`at` optional)"),
    responses((status = 200, description = "The new values: `totals` (the total bucket) and every bucket", body = IncrementAnswer),
        (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn increment(
    State(state): State<AppState>,
    caller: Caller,
    ScopePath(scope): ScopePath,
    key: Option<axum::Extension<IdempotencyKey>>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    authorize(&caller)?;
    let body: IncrementBody = body.parse()?;
    let at = body
        .at
        .as_deref()
        .map(|at| timestamp("at", at))
        .transpose()?;
    let deltas = deltas(body.deltas)?;
    // A retry with the same key is the same increment, counted once.
    let op_id = key.map(|axum::Extension(IdempotencyKey(digest))| format!("key-{digest}"));
    let result = state
        .engine
        .increment_counters(scope, deltas, at, op_id)
        .await?;
    let totals = result
        .buckets
        .iter()
        .find(|b| b.bucket.granularity == Granularity::Total)
        .map(|b| values(&b.values))
        .unwrap_or_default();
    Ok(Json(IncrementAnswer {
        scope: result.scope,
        complete: result.complete,
        totals,
        buckets: result.buckets.iter().map(BucketAnswer::from).collect(),
    })
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    granularity: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// A scope's values per bucket.
#[utoipa::path(get, path = "/v1/counters/{scope}", tag = "counters",
    summary = "Values per bucket of one granularity",
    params(("scope" = String, Path, description = "Counter scope"),
        ("granularity" = Option<String>, Query, description = "total (default), hour, day or month"),
        ("from" = Option<String>, Query, description = "RFC 3339; default: the oldest retained bucket"),
        ("to" = Option<String>, Query, description = "RFC 3339; default: now")),
    responses((status = 200, description = "Buckets with values, oldest first", body = ReadAnswer),
        (status = "default", description = "An error (problem+json with a stable code)", body = openapi::ProblemDoc, content_type = "application/problem+json")))]
pub async fn read(
    State(state): State<AppState>,
    caller: Caller,
    ScopePath(scope): ScopePath,
    ApiQuery(params): ApiQuery<ReadParams>,
) -> Result<Response, ApiError> {
    authorize(&caller)?;
    let granularity = match params.granularity.as_deref() {
        None => Granularity::Total,
        Some(text) => Granularity::parse(text).ok_or_else(|| {
            Error::InvalidRequest("granularity must be total, hour, day or month".into())
        })?,
    };
    let from = params
        .from
        .as_deref()
        .map(|t| timestamp("from", t))
        .transpose()?;
    let to = params
        .to
        .as_deref()
        .map(|t| timestamp("to", t))
        .transpose()?;
    let CounterValues {
        scope,
        buckets,
        complete,
    } = state
        .engine
        .read_counters(scope, granularity, from, to)
        .await?;
    Ok(Json(ReadAnswer {
        scope,
        granularity,
        complete,
        buckets: buckets.iter().map(BucketAnswer::from).collect(),
    })
    .into_response())
}
