//! The HTTP service (axum on tokio). Lands with issue 5; empty until then.
