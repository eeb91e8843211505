//! Persistent per-block KV store. Knows nothing about models or HTTP.
