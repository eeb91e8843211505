//! Who shares stored blocks: block keys are scoped to the tenant by default.
//!
//! A block's content key is a hash of what its KV depends on (model, tokens, position), so
//! two documents with the same text share one stored copy. Across tenants that sharing is
//! a side channel: tenant B ingesting a guessed text learns from `reused_blocks` (and from
//! an ingest a hundred times faster) whether tenant A stored it. With [`DedupScope::Tenant`]
//! (the default) the store key is the content key salted with the tenant, so B's ingest of
//! A's text finds nothing and costs a fresh ingest; re-ingesting within one tenant still
//! reuses unchanged blocks. [`DedupScope::Global`] shares blocks between all tenants (less
//! storage and compute when tenants trust each other); it is an explicit deployment choice.

use sha2::{Digest, Sha256};
use starkv_cache::BlockKey;

/// Domain separation: a scoped key never equals any content key or another scope's key.
const TENANT_SCOPE_CONTEXT: &[u8] = b"starkv 2026-12 tenant-scoped block key v1";

/// Which documents may share a stored block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DedupScope {
    /// Only documents of the same tenant share blocks (no cross-tenant signal).
    #[default]
    Tenant,
    /// All tenants share blocks with equal content. A side channel between tenants:
    /// `reused_blocks` and the ingest time tell a tenant whether another stored a text.
    Global,
}

impl DedupScope {
    /// The key a block of `tenant` is stored under, from its content key.
    pub fn store_key(self, tenant: &str, content: BlockKey) -> BlockKey {
        match self {
            DedupScope::Global => content,
            DedupScope::Tenant => {
                let mut h = Sha256::new();
                h.update(TENANT_SCOPE_CONTEXT);
                // Length-prefixed, so no (tenant, key) pair shares an encoding with another.
                h.update((tenant.len() as u64).to_le_bytes());
                h.update(tenant.as_bytes());
                h.update(content.as_bytes());
                BlockKey(h.finalize().into())
            }
        }
    }
}

impl std::str::FromStr for DedupScope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tenant" => Ok(DedupScope::Tenant),
            "global" => Ok(DedupScope::Global),
            other => Err(format!("`{other}`: expected `tenant` or `global`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_scope_separates_tenants_and_keeps_a_tenants_own_keys_stable() {
        let content = BlockKey([7; 32]);
        let a = DedupScope::Tenant.store_key("a", content);
        let b = DedupScope::Tenant.store_key("b", content);
        assert_ne!(a, b, "tenants must not share a key");
        assert_ne!(a, content, "a scoped key is not the content key");
        assert_eq!(
            a,
            DedupScope::Tenant.store_key("a", content),
            "deterministic"
        );
        assert_ne!(a, DedupScope::Tenant.store_key("a", BlockKey([8; 32])));
        // Length prefix: ("ab", k) and ("a", "b"-prefixed k) cannot collide by concatenation.
        assert_ne!(
            DedupScope::Tenant.store_key("ab", content),
            DedupScope::Tenant.store_key("a", content)
        );
        assert_eq!(DedupScope::Global.store_key("a", content), content);
        assert_eq!(DedupScope::Global.store_key("b", content), content);
    }

    #[test]
    fn scope_names_parse() {
        assert_eq!("tenant".parse(), Ok(DedupScope::Tenant));
        assert_eq!("global".parse(), Ok(DedupScope::Global));
        assert!("shared".parse::<DedupScope>().is_err());
    }
}
