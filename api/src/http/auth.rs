//! Bearer API keys with roles; every request runs as a [`Principal`].

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::config::Role;

/// Who is calling: the role their key grants and the tenant they act for.
#[derive(Debug, Clone)]
pub struct Principal {
    pub role: Role,
    pub tenant: String,
}

impl Principal {
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role.grants(role) {
            return Ok(());
        }
        Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this key has the {:?} role; the operation needs {:?}",
                self.role, role
            ),
        ))
    }
}

/// Resolves the caller from `Authorization: Bearer KEY`. With no keys configured every
/// caller is an admin of the `default` tenant (the server then listens on loopback only).
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    let principal = if keys.is_empty() {
        Principal {
            role: Role::Admin,
            tenant: "default".into(),
        }
    } else {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented.and_then(|p| {
            keys.iter()
                .find(|k| constant_time_eq(k.key.as_bytes(), p.as_bytes()))
        }) {
            Some(k) => Principal {
                role: k.role,
                tenant: k.tenant.clone(),
            },
            None => {
                return ApiError::new(
                    axum::http::StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid bearer API key is required",
                )
                .into_response();
            }
        }
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
