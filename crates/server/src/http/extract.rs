//! Request extractors. Each one turns a part of the request into a validated
//! value or an [`ApiError`], so handlers only see well-formed input.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use hybridstore_core::{CollectionName, Error, JsonObject, RecordId, RecordKey};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::AppState;
use super::problem::ApiError;
use crate::auth::Principal;

/// The authenticated caller (`Authorization: Bearer <token>`).
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let (scheme, token) = header.split_once(' ').ok_or(ApiError::Unauthorized)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::Unauthorized);
        }
        state
            .auth
            .authenticate(token.trim())
            .cloned()
            .map(Caller)
            .ok_or(ApiError::Unauthorized)
    }
}

/// A caller holding the admin token (401 without a token, 403 with another).
pub struct AdminCaller;

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(principal) = Caller::from_request_parts(parts, state).await?;
        if principal.admin {
            Ok(AdminCaller)
        } else {
            Err(ApiError::Forbidden(
                "the admin API needs the admin token".into(),
            ))
        }
    }
}

async fn path_segments<T: DeserializeOwned + Send>(parts: &mut Parts) -> Result<T, ApiError> {
    Path::<T>::from_request_parts(parts, &())
        .await
        .map(|Path(value)| value)
        .map_err(|rejection| Error::InvalidRequest(rejection.body_text()).into())
}

/// `{collection}` of the route, validated.
pub struct CollectionPath(pub CollectionName);

impl<S: Send + Sync> FromRequestParts<S> for CollectionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let collection: String = path_segments(parts).await?;
        Ok(CollectionPath(
            CollectionName::parse(&collection).map_err(Error::from)?,
        ))
    }
}

/// `{collection}/records/{id}` of the route, validated.
pub struct RecordPath(pub RecordKey);

impl<S: Send + Sync> FromRequestParts<S> for RecordPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let (collection, id): (String, String) = path_segments(parts).await?;
        let collection = CollectionName::parse(&collection).map_err(Error::from)?;
        let id = RecordId::parse(&id).map_err(Error::from)?;
        Ok(RecordPath(RecordKey::new(collection, id)))
    }
}

/// `{collection}/lookup/{index}/{value}` of the route.
pub struct LookupPath {
    pub collection: CollectionName,
    pub index: String,
    pub value: String,
}

impl<S: Send + Sync> FromRequestParts<S> for LookupPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let (collection, index, value): (String, String, String) = path_segments(parts).await?;
        Ok(LookupPath {
            collection: CollectionName::parse(&collection).map_err(Error::from)?,
            index,
            value,
        })
    }
}

/// Query parameters; a malformed one is `invalid_request`.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| Error::InvalidRequest(rejection.body_text()).into())
    }
}

/// A request body, read (within the body limit) but not yet parsed: handlers
/// parse it after authorisation, so an unauthorised caller learns nothing from
/// parse errors.
pub struct JsonBody {
    bytes: Bytes,
    content_type: Option<String>,
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let limit = request
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |limit| limit.0);
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::BodyTooLarge { limit }
                } else {
                    ApiError::InvalidJson(format!(
                        "could not read the body: {}",
                        rejection.body_text()
                    ))
                }
            })?;
        Ok(JsonBody {
            bytes,
            content_type,
        })
    }
}

/// The configured body limit, made visible to extractors for error messages.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

/// `application/json`, or any `application/<something>+json`
/// (`application/merge-patch+json` for PATCH), with optional parameters.
fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl JsonBody {
    /// The body as a JSON value of type `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        match &self.content_type {
            Some(content_type) if is_json_media_type(content_type) => {}
            _ => {
                return Err(ApiError::UnsupportedMediaType {
                    expected: "application/json",
                });
            }
        }
        serde_json::from_slice(&self.bytes).map_err(|err| {
            if err.is_data() {
                ApiError::InvalidJson(format!("unexpected JSON: {err}"))
            } else {
                ApiError::InvalidJson(format!("malformed JSON: {err}"))
            }
        })
    }

    /// The body as a JSON object (parsed off the runtime when large).
    pub async fn object(self) -> Result<JsonObject, ApiError> {
        let size = self.bytes.len();
        match super::offload(size, move || self.parse::<Value>()).await? {
            Value::Object(object) => Ok(object),
            other => Err(ApiError::InvalidJson(format!(
                "the body must be a JSON object, not {}",
                json_type(&other)
            ))),
        }
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("application/json; charset=utf-8"));
        assert!(is_json_media_type("Application/Merge-Patch+JSON"));
        assert!(!is_json_media_type("text/plain"));
        assert!(!is_json_media_type("application/x-www-form-urlencoded"));
    }
}
