//! What a call holds of its budget: a slot while it runs, a place while it asks and queues.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, PoisonError};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Budget, Pass};

/// A call's right to call the upstream under its budget; given back on drop.
pub struct BudgetSlot {
    pub(super) held: Held,
}

pub(super) enum Held {
    /// A slot in Redis, renewed from the keeper's thread until dropped.
    Fleet {
        budget: Arc<Budget>,
        token: Arc<str>,
        renewal: JoinHandle<()>,
    },
    /// A place in this process's share.
    Alone(#[allow(dead_code)] Pass),
}

/// What an upstream call holds while it runs (its body included): a place under the route's
/// per-process cap and a slot of its fleet budget, each when the route has one. Dropping it
/// gives both back.
#[derive(Default)]
pub struct Slot {
    pub local: Option<tokio::sync::OwnedSemaphorePermit>,
    pub fleet: Option<BudgetSlot>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("local", &self.local.is_some())
            .field("fleet", &self.fleet.is_some())
            .finish()
    }
}

impl Slot {
    /// Whether it holds nothing (the route has neither a cap nor a budget).
    pub fn is_empty(&self) -> bool {
        self.local.is_none() && self.fleet.is_none()
    }

    /// The slot as an answer's body keeps it until it ends; `None` when it holds nothing.
    pub fn into_guard(self) -> Option<crate::body::Guard> {
        (!self.is_empty()).then(|| crate::body::Guard::new(self))
    }
}

/// No slot within the wait allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoSlot;

/// How a queued call learns of its grant: `given` once the grant named it (a lost connection
/// only wakes it, to ask again).
#[derive(Default)]
pub(super) struct Grant {
    pub(super) given: AtomicBool,
    pub(super) wake: Notify,
}

/// A call's place while it asks and queues: registered for its grant, and — unless it was
/// granted and handed over — taken out of the queue (or its slot given back) when dropped.
pub(super) struct Place<'a> {
    budget: &'a Arc<Budget>,
    token: Arc<str>,
    pub(super) grant: Arc<Grant>,
    pub(super) queued: bool,
    granted: bool,
}

impl<'a> Place<'a> {
    pub(super) fn new(budget: &'a Arc<Budget>, token: Arc<str>) -> Place<'a> {
        let grant = Arc::new(Grant::default());
        budget
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token.clone(), grant.clone());
        Place {
            budget,
            token,
            grant,
            queued: false,
            granted: false,
        }
    }

    pub(super) fn granted(&mut self) {
        self.granted = true;
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.budget
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.token);
        if !self.granted {
            self.budget.free(self.token.clone());
        }
    }
}

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        if let Held::Fleet {
            budget,
            token,
            renewal,
        } = &self.held
        {
            renewal.abort();
            budget.free(token.clone());
        }
    }
}
