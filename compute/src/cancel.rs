//! Cooperative cancellation of model work: a flag the caller sets (its client hung up, the
//! server is shutting down) and the work checks between units it cannot interrupt (a
//! layer of a forward pass on the CPU, a generation step, a block load), so abandoned
//! work stops within one such unit instead of running to the end while it holds a slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// A cancellation flag shared between the requester and the work. Clones share the flag.
/// A child ([`Cancel::child`]) is cancelled with its parent, never the other way round.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    own: Arc<AtomicBool>,
    parent: Option<Arc<AtomicBool>>,
}

impl Cancel {
    /// A flag that is not set (and never will be unless [`Cancel::cancel`] is called).
    pub fn new() -> Self {
        Self::default()
    }

    /// A new flag that is also set whenever this one is (e.g. a request's flag under the
    /// server's shutdown flag).
    pub fn child(&self) -> Self {
        Self {
            own: Arc::new(AtomicBool::new(false)),
            parent: Some(self.own.clone()),
        }
    }

    /// Asks the work to stop (idempotent).
    pub fn cancel(&self) {
        self.own.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.own.load(Ordering::Acquire)
            || self
                .parent
                .as_ref()
                .is_some_and(|p| p.load(Ordering::Acquire))
    }

    /// `Err(Error::Cancelled)` once cancelled: `cancel.check()?` between units of work.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag_and_children_follow_their_parent_only() {
        let root = Cancel::new();
        let clone = root.clone();
        let child = root.child();
        let sibling = root.child();
        assert!(!root.is_cancelled() && !child.is_cancelled());
        assert!(child.check().is_ok());
        child.cancel();
        assert!(child.is_cancelled());
        assert!(matches!(child.check(), Err(Error::Cancelled)));
        assert!(!root.is_cancelled(), "a child does not cancel its parent");
        assert!(!sibling.is_cancelled());
        clone.cancel();
        assert!(root.is_cancelled(), "clones share the flag");
        assert!(sibling.is_cancelled(), "children follow their parent");
    }
}
