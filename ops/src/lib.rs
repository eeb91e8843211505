//! Operator commands (eviction, verify, repair). Lands with issue 5; empty until then.
