//! The service's error type: one variant per way a caller must react (the HTTP layer
//! maps each to a status code, the CLI to an exit code).

/// Why a service call failed; the HTTP layer maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    QuotaExceeded(String),
    /// The disk is full or under the configured free-space floor (HTTP 507).
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Internal(String),
    /// A part of the cluster needed to answer is down and nothing could take its place
    /// (retrying later may succeed).
    #[error("{0}")]
    Unavailable(String),
}

impl From<starkv_cache::Error> for ServiceError {
    fn from(e: starkv_cache::Error) -> Self {
        match e {
            starkv_cache::Error::NotFound { .. } => ServiceError::NotFound(e.to_string()),
            starkv_cache::Error::InvalidArgument(m) => ServiceError::Invalid(m),
            starkv_cache::Error::QuotaExceeded { .. } => ServiceError::QuotaExceeded(e.to_string()),
            starkv_cache::Error::DiskFull { .. } => {
                ServiceError::InsufficientStorage(e.to_string())
            }
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

impl From<starkv_compute::Error> for ServiceError {
    fn from(e: starkv_compute::Error) -> Self {
        match e {
            starkv_compute::Error::InvalidInput(m) => ServiceError::Invalid(m),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;
