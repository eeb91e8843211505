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
    /// The caller cancelled the work (its client hung up, or the server is shutting down).
    #[error("the work was cancelled")]
    Cancelled,
}

impl ServiceError {
    /// What a client may be told. Internal errors can name server files (a store path, the
    /// model file) and say nothing a client can act on: their text goes to the log only.
    pub fn public_message(&self) -> String {
        match self {
            ServiceError::Internal(_) => {
                "internal error; the server log has the details".to_string()
            }
            other => other.to_string(),
        }
    }
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
            starkv_compute::Error::Cancelled => ServiceError::Cancelled,
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_messages_hide_internal_details_only() {
        let internal =
            ServiceError::Internal("store: IO error: /var/lib/starkv/store/meta/LOCK".into());
        assert!(!internal.public_message().contains("/var"));
        let invalid = ServiceError::Invalid("the document is empty".into());
        assert_eq!(invalid.public_message(), "the document is empty");
        let from_compute = ServiceError::from(starkv_compute::Error::Cancelled);
        assert!(matches!(from_compute, ServiceError::Cancelled));
    }
}
