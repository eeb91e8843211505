//! Tenants and document ids: what a caller may name a document, and the store's name
//! for it. Every front end (HTTP, the operator CLI) goes through here, so a document
//! ingested over HTTP is the one the CLI finds.

use crate::{ServiceError, ServiceResult};

/// Longest document id accepted.
pub const MAX_DOC_ID_LEN: usize = 128;

/// Document ids: 1-128 characters of `[A-Za-z0-9._-]`, other than `.` and `..`, so they
/// are safe in paths, keys and URLs.
pub fn validate_doc_id(id: &str) -> ServiceResult<()> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= MAX_DOC_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::Invalid(
            "document ids are 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-', other than '.' and '..'"
                .into(),
        ))
    }
}

/// The store's name of document `id` of `tenant`: `tenant/id`. Tenants never see each
/// other's documents because every lookup goes through this name.
pub fn store_doc_id(tenant: &str, id: &str) -> String {
    format!("{tenant}/{id}")
}

/// The `(tenant, id)` of a store name made by [`store_doc_id`].
pub fn split_store_doc_id(name: &str) -> Option<(&str, &str)> {
    name.split_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_names_round_trip() {
        for good in ["a", "doc-1.v2_x", "..x", "...", &"x".repeat(128)] {
            assert!(validate_doc_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(129)] {
            assert!(
                matches!(validate_doc_id(bad), Err(ServiceError::Invalid(_))),
                "{bad}"
            );
        }
        let name = store_doc_id("acme", "report");
        assert_eq!(name, "acme/report");
        assert_eq!(split_store_doc_id(&name), Some(("acme", "report")));
    }
}
