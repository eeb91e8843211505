//! Extractors whose rejections use the API's JSON error shape. axum's own `Query` and
//! `Path` answer a bad query string (`?offset=-1`, `?wait=maybe`) or a path parameter that
//! is not UTF-8 with text/plain; these wrap them and answer `{"error": {...}}`.

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// `Query<T>` with JSON rejections (400 `invalid_query`).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(r) => Err(ApiError::new(r.status(), "invalid_query", r.body_text())),
        }
    }
}

/// `Path<T>` with JSON rejections (e.g. 400 `invalid_path` for a parameter that is not
/// UTF-8 once percent-decoded).
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(r) => {
                let status = r.status();
                let code = if status.is_server_error() {
                    "internal"
                } else {
                    "invalid_path"
                };
                Err(ApiError::new(status, code, r.body_text()))
            }
        }
    }
}
