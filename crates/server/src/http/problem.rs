//! Errors as RFC 9457 problem details.
//!
//! Every failure the API can report is an [`ApiError`]; each has one HTTP status
//! and one stable `code` that clients can branch on. Internal errors are logged
//! here, inside the request's span (method, route), and answered with a body that
//! says nothing about them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hybridstore_api::ProblemDocument;
use hybridstore_core::Error;
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Domain(#[from] Error),
    #[error("{0}")]
    InvalidJson(String),
    #[error("expected Content-Type {expected}")]
    UnsupportedMediaType { expected: &'static str },
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still in progress; retry shortly")]
    IdempotencyInProgress,
}

/// Every problem the API can answer, as (status, code, title), in the
/// order of the variants, each code once: the docs page lists them. Made
/// from one value of each variant, so the list says what the answers say.
pub(crate) fn catalogue() -> Vec<(u16, &'static str, &'static str)> {
    use std::time::Duration;
    let second = Duration::from_secs(1);
    let errors = [
        ApiError::Domain(Error::InvalidName(
            hybridstore_core::CollectionName::parse("").expect_err("an empty name is invalid"),
        )),
        ApiError::Domain(Error::InvalidRequest(String::new())),
        ApiError::Domain(Error::InvalidData(String::new())),
        ApiError::Domain(Error::UnknownCollection(String::new())),
        ApiError::Domain(Error::NotFound(String::new())),
        ApiError::Domain(Error::SchemaViolation(Vec::new())),
        ApiError::Domain(Error::PayloadTooLarge { size: 0, limit: 0 }),
        ApiError::Domain(Error::VersionConflict { current: None }),
        ApiError::Domain(Error::UniqueViolation {
            index: String::new(),
            value: String::new(),
        }),
        ApiError::Domain(Error::CounterOutOfRange(String::new())),
        ApiError::Domain(Error::ForceRequired(String::new())),
        ApiError::Domain(Error::NotAllowed(String::new())),
        ApiError::Domain(Error::BackendsUnavailable {
            retry_after: second,
        }),
        ApiError::Domain(Error::Overloaded {
            retry_after: second,
        }),
        ApiError::Domain(Error::OutcomeUnknown {
            retry_after: second,
        }),
        ApiError::Domain(Error::Internal(String::new())),
        ApiError::InvalidJson(String::new()),
        ApiError::UnsupportedMediaType { expected: "" },
        ApiError::BodyTooLarge { limit: 0 },
        ApiError::Unauthorized,
        ApiError::Forbidden(String::new()),
        ApiError::RouteNotFound,
        ApiError::MethodNotAllowed,
        ApiError::IdempotencyKeyReused,
        ApiError::IdempotencyInProgress,
    ];
    let mut listed: Vec<(u16, &'static str, &'static str)> = Vec::new();
    for error in &errors {
        let problem = error.problem();
        if !listed.iter().any(|(_, code, _)| *code == problem.code) {
            listed.push((problem.status.as_u16(), problem.code, problem.title));
        }
    }
    listed
}

/// One problem document, before it becomes a response.
struct Problem {
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    detail: String,
    extra: Option<(&'static str, Value)>,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    fn problem(&self) -> Problem {
        let plain = |status, code, title, detail: String| Problem {
            status,
            code,
            title,
            detail,
            extra: None,
            retry_after_secs: None,
        };
        match self {
            ApiError::Domain(err) => match err {
                Error::InvalidName(e) => plain(
                    StatusCode::BAD_REQUEST,
                    "invalid_name",
                    "Invalid name",
                    e.to_string(),
                ),
                Error::InvalidRequest(m) => plain(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Invalid request",
                    m.clone(),
                ),
                Error::InvalidData(m) => plain(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    "Invalid JSON",
                    m.clone(),
                ),
                Error::UnknownCollection(_) => plain(
                    StatusCode::NOT_FOUND,
                    "unknown_collection",
                    "Unknown collection",
                    err.to_string(),
                ),
                Error::NotFound(m) => {
                    plain(StatusCode::NOT_FOUND, "not_found", "Not found", m.clone())
                }
                Error::SchemaViolation(errors) => Problem {
                    extra: Some(("errors", json!(errors))),
                    ..plain(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "schema_violation",
                        "Schema violation",
                        err.to_string(),
                    )
                },
                Error::PayloadTooLarge { .. } => plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "Payload too large",
                    err.to_string(),
                ),
                Error::VersionConflict { current } => Problem {
                    extra: current.map(|v| ("current_version", json!(v))),
                    ..plain(
                        StatusCode::PRECONDITION_FAILED,
                        "version_conflict",
                        "Version conflict",
                        "the record's current state does not match the request's precondition"
                            .into(),
                    )
                },
                Error::UniqueViolation { .. } => plain(
                    StatusCode::CONFLICT,
                    "unique_violation",
                    "Unique index violation",
                    err.to_string(),
                ),
                Error::CounterOutOfRange(m) => plain(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "counter_out_of_range",
                    "Counter out of range",
                    m.clone(),
                ),
                Error::ForceRequired(m) => plain(
                    StatusCode::CONFLICT,
                    "force_required",
                    "Force required",
                    m.clone(),
                ),
                Error::NotAllowed(m) => plain(
                    StatusCode::CONFLICT,
                    "not_allowed",
                    "Not allowed now",
                    m.clone(),
                ),
                Error::BackendsUnavailable { retry_after } => Problem {
                    retry_after_secs: Some(retry_after.as_secs().max(1)),
                    ..plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "backends_unavailable",
                        "Backends unavailable",
                        "no storage tier can serve this request now; retry later".into(),
                    )
                },
                Error::Overloaded { retry_after } => Problem {
                    retry_after_secs: Some(retry_after.as_secs().max(1)),
                    ..plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        "Overloaded",
                        "the service is at capacity; nothing of this request was applied, retry later"
                            .into(),
                    )
                },
                Error::OutcomeUnknown { retry_after } => Problem {
                    retry_after_secs: Some(retry_after.as_secs().max(1)),
                    ..plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "outcome_unknown",
                        "Outcome unknown",
                        "the storage tier did not answer in time: the write may or may not have been applied; retry it with the same Idempotency-Key"
                            .into(),
                    )
                },
                Error::Internal(_) => plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    "the request failed inside the service; it has been logged".into(),
                ),
            },
            ApiError::InvalidJson(m) => plain(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "Invalid JSON",
                m.clone(),
            ),
            ApiError::UnsupportedMediaType { .. } => plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Unsupported media type",
                self.to_string(),
            ),
            ApiError::BodyTooLarge { .. } => plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
                self.to_string(),
            ),
            ApiError::Unauthorized => plain(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                self.to_string(),
            ),
            ApiError::Forbidden(m) => {
                plain(StatusCode::FORBIDDEN, "forbidden", "Forbidden", m.clone())
            }
            ApiError::RouteNotFound => plain(
                StatusCode::NOT_FOUND,
                "not_found",
                "Not found",
                self.to_string(),
            ),
            ApiError::MethodNotAllowed => plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
                self.to_string(),
            ),
            ApiError::IdempotencyKeyReused => plain(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "Idempotency key reused",
                self.to_string(),
            ),
            ApiError::IdempotencyInProgress => Problem {
                retry_after_secs: Some(1),
                ..plain(
                    StatusCode::CONFLICT,
                    "idempotency_in_progress",
                    "Idempotent request in progress",
                    self.to_string(),
                )
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Domain(Error::Internal(message)) = &self {
            tracing::error!(error = %message, "request failed with an internal error");
        }
        let problem = self.problem();
        let mut body = ProblemDocument {
            kind: format!("urn:hybridstore:problem:{}", problem.code),
            title: problem.title.to_owned(),
            status: problem.status.as_u16(),
            detail: problem.detail,
            code: problem.code.to_owned(),
            extra: Default::default(),
        };
        if let Some((key, value)) = problem.extra {
            body.extra.insert(key.to_owned(), value);
        }
        let body = serde_json::to_string(&body).unwrap_or_default();
        let mut response = (problem.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if problem.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = problem.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_do_not_leak() {
        let secret = "password=hunter2 at 10.0.0.1";
        let problem = ApiError::from(Error::Internal(secret.into())).problem();
        assert_eq!(problem.code, "internal");
        assert!(!problem.detail.contains("hunter2"));
    }
}
