//! Admission: how much request work the service takes on at once.
//!
//! Without a bound, a flood of large writes is read, parsed and sent to the
//! tiers all at once: memory grows with the flood, the tiers queue up until
//! calls time out, and the service answers late and wrong. So every request
//! first takes a slot, and a request with a body takes room for its bytes as
//! well (its Content-Length, or the body limit when it does not say). A
//! request that finds no room within `queue_wait` is shed: `503 overloaded`
//! with `Retry-After`, before anything of it was parsed or written, so the
//! client may simply send it again. The liveness, readiness and metrics
//! routes are never held back: they must answer most when the service is
//! busiest.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::AppState;
use super::problem::ApiError;
use hybridstore_core::Error;

/// The bounds (config section `limits`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests served at once.
    pub max_requests: usize,
    /// Request body bytes held at once.
    pub request_bytes: usize,
    /// Longest a request waits for room before it is shed.
    pub queue_wait: Duration,
    /// The largest body a request may have.
    pub body_limit: usize,
}

/// Shed bodies drained at once.
const DRAINS: usize = 8;

/// Room is counted in KiB: a semaphore holds at most `u32::MAX >> 3` permits.
const UNIT: usize = 1024;

pub struct Admission {
    limits: Limits,
    requests: Semaphore,
    bytes: Semaphore,
    /// Shed requests whose bodies are being drained (each drain holds a
    /// connection's read buffer, up to a few hundred KiB).
    drains: Semaphore,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            requests: Semaphore::new(limits.max_requests.max(1)),
            bytes: Semaphore::new(limits.request_bytes.div_ceil(UNIT).max(1)),
            drains: Semaphore::new(DRAINS),
        })
    }

    /// The room a request's body takes, in units: what it says it sends, or
    /// the most it may send; never more than all there is (a body larger
    /// than the room is refused by the body limit, not starved here).
    fn room_for(&self, request: &Request) -> u32 {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        let body = match declared {
            Some(length) => length.min(self.limits.body_limit),
            None if request.method() == axum::http::Method::GET
                || request.method() == axum::http::Method::HEAD
                || request.method() == axum::http::Method::DELETE =>
            {
                0
            }
            None => self.limits.body_limit,
        };
        let total = self.limits.request_bytes.div_ceil(UNIT).max(1);
        body.div_ceil(UNIT).min(total) as u32
    }
}

fn exempt(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

/// The middleware: takes a slot and room for the body, or sheds.
pub async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let admission = &state.admission;
    if exempt(request.uri().path()) {
        return next.run(request).await;
    }
    let room = admission.room_for(&request);
    let wait = admission.limits.queue_wait;
    let permits = tokio::time::timeout(wait, async {
        let slot = admission.requests.acquire().await;
        let bytes = if room == 0 {
            None
        } else {
            Some(admission.bytes.acquire_many(room).await)
        };
        (slot, bytes)
    })
    .await;
    match permits {
        Ok((Ok(_slot), bytes)) if bytes.as_ref().is_none_or(Result::is_ok) => {
            next.run(request).await
        }
        _ => {
            state.metrics.shed();
            if let Ok(_draining) = admission.drains.acquire().await {
                drain(request, admission.limits.body_limit).await;
            }
            ApiError::from(Error::Overloaded {
                retry_after: Duration::from_secs(1),
            })
            .into_response()
        }
    }
}

/// Reads and drops what the client sends of a shed request's body (at most
/// the body limit, a chunk at a time: nothing is kept). Answered before its
/// body was read, the client would still be sending: the connection closes
/// under it, and it sees a reset instead of the 503 and its `Retry-After`.
async fn drain(request: Request, limit: usize) {
    use futures_util::StreamExt;
    let mut body = request.into_body().into_data_stream();
    let mut read = 0;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len();
            if read > limit {
                break;
            }
        }
    })
    .await;
}
