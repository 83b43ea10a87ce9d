//! `Idempotency-Key` on mutating calls (SPEC section 3): the first response
//! is stored for 24 hours and a retry with the same key gets it back, marked
//! `Idempotent-Replayed: true`, without the call running again. The key is
//! scoped to the caller (two clients may use the same key), and bound to the
//! request: the same key with another method, path, preconditions or body is
//! a 422 `idempotency_key_reused`. A response that failed inside (5xx), or
//! an auth or rate refusal (401, 403, 429), is not stored: the retry runs.
//! What the cache keeps of stored responses is bounded per caller and in
//! all, in count and bytes (`idempotency.*`): past a bound, or above 2 MiB,
//! the response is not stored, says so with `Idempotent-Stored: false`, and
//! a retry runs again.
//! Only matched routes take part: an unknown path or method answers 404 or
//! 405 whatever key it carries. Keys live in the cache tier; while it is down,
//! calls run without replay protection (counter increments still count once:
//! their id comes from the key).

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hybridstore_core::{Error, IdempotencyClaim};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AppState;
use super::extract::BodyLimit;
use super::problem::ApiError;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// On a response that was not stored for replay (past a bound of what the
/// cache keeps, or too large): `false`. A retry with the key runs again.
const STORED: HeaderName = HeaderName::from_static("idempotent-stored");
/// Largest response stored for replay.
const MAX_STORED_RESPONSE: usize = 2 * 1024 * 1024;

/// The caller-scoped digest of a request's key, for handlers that derive an
/// operation id from it (counter increments).
#[derive(Clone, Debug)]
pub struct IdempotencyKey(pub String);

#[derive(Serialize, Deserialize)]
struct StoredResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The caller's name, when the request carries a valid token.
fn caller(state: &AppState, headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    state
        .auth
        .authenticate(token.trim())
        .map(|principal| principal.name.clone())
}

fn replay(stored: &[u8]) -> Option<Response> {
    let stored: StoredResponse = serde_json::from_slice(stored).ok()?;
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).ok()?;
    for (name, value) in stored.headers {
        response.headers_mut().insert(
            HeaderName::try_from(name).ok()?,
            HeaderValue::try_from(value).ok()?,
        );
    }
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    Some(response)
}

pub async fn idempotency(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let mutating = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let Some(key) = request.headers().get(&IDEMPOTENCY_KEY).filter(|_| mutating) else {
        return next.run(request).await;
    };
    let key = match key.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
            key.to_owned()
        }
        _ => {
            return ApiError::from(Error::InvalidRequest(
                "Idempotency-Key must be 1 to 255 printable ASCII characters".into(),
            ))
            .into_response();
        }
    };
    // Without a valid token the handler answers 401; nothing to protect.
    let Some(owner) = caller(&state, request.headers()) else {
        return next.run(request).await;
    };
    let limit = request
        .extensions()
        .get::<BodyLimit>()
        .map_or(usize::MAX, |limit| limit.0);
    let (mut parts, body) = request.into_parts();
    let Ok(bytes) = to_bytes(body, limit).await else {
        return ApiError::BodyTooLarge { limit }.into_response();
    };
    let mut fingerprint = Sha256::new();
    for part in [
        parts.method.as_str(),
        &parts.uri.to_string(),
        parts
            .headers
            .get(header::IF_MATCH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        parts
            .headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    ] {
        fingerprint.update(part.as_bytes());
        fingerprint.update([0]);
    }
    let fingerprint = {
        let bytes = bytes.clone();
        super::offload(bytes.len(), move || {
            fingerprint.update(&bytes);
            hex(fingerprint.finalize())
        })
        .await
    };
    let digest = hex(Sha256::digest(format!("{owner}\0{key}")));
    parts.extensions.insert(IdempotencyKey(digest.clone()));
    let request = Request::from_parts(parts, Body::from(bytes));

    // From the claim on, the work runs to its end even if the client goes
    // away (a timeout): a claim left behind would hold the key for a minute,
    // while a finished first attempt lets the retry replay at once.
    let claim = Claim {
        owner,
        digest,
        fingerprint,
    };
    let work = tokio::spawn(claim_and_run(state, next, request, claim));
    work.await.unwrap_or_else(|err| {
        ApiError::from(Error::Internal(format!("idempotent request failed: {err}"))).into_response()
    })
}

/// Whose key, which key, for which request.
struct Claim {
    owner: String,
    digest: String,
    fingerprint: String,
}

async fn claim_and_run(state: AppState, next: Next, request: Request, claim: Claim) -> Response {
    let claimed = state
        .engine
        .claim_idempotency(&claim.owner, &claim.digest, &claim.fingerprint)
        .await;
    match claimed {
        None => next.run(request).await,
        Some(IdempotencyClaim::Mismatch) => ApiError::IdempotencyKeyReused.into_response(),
        Some(IdempotencyClaim::InProgress) => ApiError::IdempotencyInProgress.into_response(),
        Some(IdempotencyClaim::Done(stored)) => replay(&stored).unwrap_or_else(|| {
            ApiError::from(Error::Internal(
                "undecodable stored idempotent response".into(),
            ))
            .into_response()
        }),
        Some(IdempotencyClaim::Claimed) => run_and_store(state, next, request, claim).await,
    }
}

/// Runs the claimed request and stores its response (or releases the key
/// when it failed inside, or when the response cannot be kept).
async fn run_and_store(state: AppState, next: Next, request: Request, claim: Claim) -> Response {
    let response = next.run(request).await;
    // Not the outcome of the request, only of this attempt: a failure inside
    // (5xx), or a refusal a retry may not meet (the caller's rights were
    // changed, a limit let up). The retry runs.
    let status = response.status();
    if status.is_server_error()
        || status == StatusCode::UNAUTHORIZED
        || status == StatusCode::FORBIDDEN
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        state
            .engine
            .release_idempotency(&claim.owner, &claim.digest)
            .await;
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // The handlers' answers are bounded (a record is at most the body
    // limit); the cap only guards against a bug.
    let Ok(body) = to_bytes(body, 4 * MAX_STORED_RESPONSE).await else {
        state
            .engine
            .release_idempotency(&claim.owner, &claim.digest)
            .await;
        return ApiError::from(Error::Internal("response too large".into())).into_response();
    };
    let kept = [header::CONTENT_TYPE, header::ETAG, header::LOCATION];
    let stored = StoredResponse {
        status: parts.status.as_u16(),
        headers: kept
            .iter()
            .filter_map(|name| {
                let value = parts.headers.get(name)?.to_str().ok()?;
                Some((name.to_string(), value.to_owned()))
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let bytes = serde_json::to_vec(&stored).ok();
    let stored = match bytes.filter(|bytes| bytes.len() <= MAX_STORED_RESPONSE) {
        Some(bytes) => {
            state
                .engine
                .complete_idempotency(&claim.owner, &claim.digest, &claim.fingerprint, &bytes)
                .await
        }
        None => {
            state
                .engine
                .release_idempotency(&claim.owner, &claim.digest)
                .await;
            false
        }
    };
    if !stored {
        parts
            .headers
            .insert(STORED, HeaderValue::from_static("false"));
    }
    Response::from_parts(parts, Body::from(body))
}
