//! What the invalidation channel carries: a purge, and whether it removes or marks stale.

use super::Purge;

/// What a purge does to the entries it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Removes them (a hard purge): the next request for each is a miss.
    Delete,
    /// Marks those stored before `at` (Unix ms) and fresh then as stale (a soft purge, see
    /// [`crate::entry::Lifetime::marked_stale`]). Fills under way are not fenced off: a soft purge
    /// only wants its entries refreshed, and an answer that arrives after it is one.
    MarkStale { at: u64 },
}

/// A purge and what it does to what it covers: what the invalidation channel carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeOrder {
    pub purge: Purge,
    pub mode: Mode,
}

impl PurgeOrder {
    /// A hard purge of what `purge` names.
    pub fn delete(purge: Purge) -> PurgeOrder {
        PurgeOrder {
            purge,
            mode: Mode::Delete,
        }
    }

    /// The invalidation message: a hard purge's is the purge's own payload (what instances
    /// before soft purges understand), a soft one's is `soft <at> <payload>` (which they ignore).
    pub fn payload(&self) -> String {
        match self.mode {
            Mode::Delete => self.purge.payload(),
            Mode::MarkStale { at } => format!("soft {at} {}", self.purge.payload()),
        }
    }

    /// Reads an invalidation message. `all` is never soft: it is never published.
    pub fn parse(payload: &[u8]) -> Option<PurgeOrder> {
        let Some(soft) = payload.strip_prefix(b"soft ") else {
            return Purge::parse(payload).map(PurgeOrder::delete);
        };
        let text = std::str::from_utf8(soft).ok()?;
        let (at, rest) = text.split_once(' ')?;
        let purge = Purge::parse(rest.as_bytes()).filter(|p| *p != Purge::All)?;
        let at = at.parse().ok()?;
        Some(PurgeOrder {
            purge,
            mode: Mode::MarkStale { at },
        })
    }
}
