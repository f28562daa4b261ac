//! The reconciler: one task that makes the server's subscriptions match the channels that have
//! local waiters (plus the invalidation channel), in order, in one batch each, and resyncs the
//! waiters when a disconnection or a move to another node may have lost notices.
//!
//! It is one state machine — events in, actions out — driven by the thin I/O loop in
//! `reconciler/io.rs`; the machine does no I/O, so every transition is a plain unit test
//! (`reconciler/tests.rs`). A pass:
//!
//! ```text
//!  Wait ─requests─▶ FollowMaster ─followed─┬─ no node yet ─▶ nack, Wait (retry)
//!                                          └─▶ Subscribe ─ack held─▶ Unsubscribe ─▶ SyncSharded ─┬─ ok ─▶ ack, Wait
//!                                                                                                ├─ circuit open ─▶ nack, Wait (retry)
//!                                                                                                └─ failed ─▶ Fail ─▶ nack, Wait (retry)
//! ```
//! Each step is skipped when it has nothing to do, and a failed step skips the rest of the pass,
//! but for an unsubscription. New channels come first: once the server confirms them, the
//! waiters on them are answered at once ("ack held"), without waiting for the drops of the
//! channels nobody wants any more (within one pass the two sets are disjoint, so their order
//! changes nothing else; in a cluster the sharded drops and subscriptions go out together).
//! Behind sentinels, a SUBSCRIBE that their `+switch-master` cuts short (the old master may
//! never answer) starts the pass again at `FollowMaster`, its acknowledgements still pending.
//! An unsubscription's failure fails nobody: a channel nobody waits on costs nobody anything
//! while it stays, so its failure is remembered ([`Reconciler`]'s `doubtful`, tried again) and
//! the pass goes on; only once its waiters are answered does the failure go to the topology, as
//! any failure of the node does (behind sentinels, a master that stopped answering is looked for
//! again). Failing the waiters made each fill on its own: a slow UNSUBSCRIBE under a burst cost
//! an upstream call per key.
//! A move to another node (following the sentinels, or after failures) leaves nothing subscribed
//! there, and notices may have been lost on the way: every waiter resyncs.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Request;
use super::topology::NO_MASTER_YET;
use crate::l2::L2Error;

mod io;
#[cfg(test)]
mod tests;

pub(super) use io::Driver;

/// How often a failed (re)subscription is tried again.
pub(super) const RETRY: Duration = Duration::from_secs(1);

/// Where a [`Request::Sync`] is acknowledged.
type Ack = oneshot::Sender<Result<(), String>>;

/// A [`Request::Sync`] of the pass under way: the channel its asker waits on, if any.
#[derive(Debug)]
struct Pending {
    channel: Option<String>,
    ack: Ack,
}

/// What happened, as the I/O loop reports it.
#[derive(Debug)]
pub(super) enum Event {
    /// Requests arrived (all those pending, in order), or the retry timer fired
    /// ([`Request::Retry`]).
    Requests(Vec<Request>),
    /// The topology was followed: `moved` to another node (nothing is subscribed there);
    /// `connected` to a node at all; `waited_on`: the channels that have local waiters now.
    Followed {
        moved: bool,
        connected: bool,
        waited_on: HashSet<String>,
    },
    /// The classic UNSUBSCRIBE answered (or failed, which the I/O loop logs).
    Unsubscribed(Result<(), L2Error>),
    /// The classic SUBSCRIBE answered.
    Subscribed(Result<(), L2Error>),
    /// Behind sentinels, they announced a new master while the SUBSCRIBE waited on the old one.
    MasterSwitched,
    /// The sharded (un)subscriptions answered, each on its own: those `dropped` and `added`
    /// succeeded, those `undropped` failed (the last SUNSUBSCRIBE's failure: `drop_failure`);
    /// `result` is the last failure of an SSUBSCRIBE, if any.
    ShardedSynced {
        dropped: Vec<String>,
        undropped: Vec<String>,
        drop_failure: Option<L2Error>,
        added: Vec<String>,
        result: Result<(), L2Error>,
    },
    /// The topology took the failure: `moved` to the next node, if it did.
    FailedOver { moved: bool },
}

/// What the I/O loop does, without waiting for an answer.
#[derive(Debug)]
pub(super) enum Effect {
    /// Behind sentinels: have them asked again before the next pass.
    Recheck,
    /// The sentinels announced a new master: ask them now.
    Switched,
    /// Tell every waiter that notices may have been lost: confirm, then re-check L2.
    Resync,
    /// The server just confirmed the invalidation channel's SUBSCRIBE.
    InvalidationSubscribed,
    /// The node answered the whole pass.
    Answered,
    /// Answer the [`Request::Sync`]s of the pass, each with its own result.
    Ack(Vec<(Ack, Result<(), String>)>),
}

/// What the I/O loop waits for next: each answer comes back as one [`Event`].
#[derive(Debug)]
pub(super) enum Io {
    /// Wait for requests; with `retry`, for at most [`RETRY`] (then [`Request::Retry`]).
    Wait { retry: bool },
    /// Follow the topology (behind sentinels, ask them when due) and read who waits:
    /// [`Event::Followed`].
    FollowMaster,
    /// UNSUBSCRIBE these channels on the classic connection: [`Event::Unsubscribed`].
    Unsubscribe(Vec<String>),
    /// SUBSCRIBE these channels on the classic connection: [`Event::Subscribed`].
    Subscribe(Vec<String>),
    /// In a cluster, SUNSUBSCRIBE and SSUBSCRIBE these: [`Event::ShardedSynced`].
    SyncSharded { drop: Vec<String>, add: Vec<String> },
    /// Report the failure of the pass to the topology (and the log): [`Event::FailedOver`].
    Fail(L2Error),
}

/// One step: effects to apply in order, then the one thing to wait for.
#[derive(Debug)]
pub(super) struct Step {
    pub(super) effects: Vec<Effect>,
    pub(super) then: Io,
}

/// The reconciler's state: what the server holds, and the pass under way.
#[derive(Debug)]
pub(super) struct Reconciler {
    /// Channels the server holds for this process, as far as it has confirmed.
    subscribed: HashSet<String>,
    /// Channels whose unsubscription failed: the server may hold them still (most likely not: a
    /// command that was sent is carried out, its answer was only late). Not in `subscribed`, so
    /// a waiter that comes for one subscribes it again; unsubscribed again on the next pass
    /// otherwise (which is harmless either way).
    doubtful: HashSet<String>,
    /// The invalidation channel: wanted whether or not anyone waits, always classic.
    invalidation: String,
    /// In a cluster fill channels are subscribed sharded; only the invalidation channel is
    /// classic.
    sharded: bool,
    /// The [`Request::Sync`]s the pass under way answers.
    acks: Vec<Pending>,
    /// The pass under way: the classic channels to drop, then to add; then the sharded ones.
    to_drop: Vec<String>,
    to_add: Vec<String>,
    drop_sharded: Vec<String>,
    add_sharded: Vec<String>,
    /// Why the pass under way failed, for its acknowledgements.
    failure: Option<String>,
    /// An unsubscription of the pass under way failed: the topology hears of it once the
    /// waiters are answered.
    drop_failure: Option<L2Error>,
}

impl Reconciler {
    /// A reconciler for `invalidation`, the channel subscribed whatever waits; `sharded` in a
    /// cluster.
    pub(super) fn new(invalidation: String, sharded: bool) -> Reconciler {
        Reconciler {
            subscribed: HashSet::new(),
            doubtful: HashSet::new(),
            invalidation,
            sharded,
            acks: Vec::new(),
            to_drop: Vec::new(),
            to_add: Vec::new(),
            drop_sharded: Vec::new(),
            add_sharded: Vec::new(),
            failure: None,
            drop_failure: None,
        }
    }

    /// The first step: wait for the first request.
    pub(super) fn start(&self) -> Step {
        step(Vec::new(), Io::Wait { retry: false })
    }

    /// The next step after `event`.
    pub(super) fn on(&mut self, event: Event) -> Step {
        match event {
            Event::Requests(requests) => self.requested(requests),
            Event::Followed {
                moved,
                connected,
                waited_on,
            } => self.followed(moved, connected, waited_on),
            Event::Unsubscribed(Ok(())) => {
                for channel in std::mem::take(&mut self.to_drop) {
                    self.subscribed.remove(&channel);
                }
                self.sync_sharded(Vec::new())
            }
            Event::Subscribed(Ok(())) => {
                let added = std::mem::take(&mut self.to_add);
                let mut effects = Vec::new();
                if added.contains(&self.invalidation) {
                    effects.push(Effect::InvalidationSubscribed);
                }
                self.subscribed.extend(added);
                // Their waiters need not wait for the rest of the pass.
                effects.extend(self.ack_held());
                self.unsubscribe(effects)
            }
            // The circuit is open: nothing was asked, nothing else will be answered.
            Event::Unsubscribed(Err(err @ L2Error::CircuitOpen { .. })) => {
                self.finish(Vec::new(), Err(err))
            }
            Event::Unsubscribed(Err(err)) => {
                let undropped = std::mem::take(&mut self.to_drop);
                self.doubt(undropped);
                self.drop_failure = Some(err);
                self.sync_sharded(Vec::new())
            }
            Event::Subscribed(Err(err)) => self.finish(Vec::new(), Err(err)),
            // The pass starts again on the new master; its acknowledgements wait for that.
            Event::MasterSwitched => {
                self.end_pass();
                step(vec![Effect::Switched], Io::FollowMaster)
            }
            Event::ShardedSynced {
                dropped,
                undropped,
                drop_failure,
                added,
                result,
            } => {
                for channel in &dropped {
                    self.subscribed.remove(channel);
                }
                self.doubt(undropped);
                if drop_failure.is_some() {
                    self.drop_failure = drop_failure;
                }
                self.subscribed.extend(added);
                self.finish(Vec::new(), result)
            }
            Event::FailedOver { moved } => {
                let mut effects = Vec::new();
                if moved {
                    effects.push(self.moved());
                }
                let reason = self.failure.take().unwrap_or_default();
                effects.push(self.ack(Err(reason)));
                step(effects, Io::Wait { retry: true })
            }
        }
    }

    /// The channels the server holds for this process, as far as it has confirmed.
    #[cfg(test)]
    pub(super) fn subscribed(&self) -> &HashSet<String> {
        &self.subscribed
    }

    /// The channels whose unsubscription failed, to be unsubscribed again.
    #[cfg(test)]
    pub(super) fn doubtful(&self) -> &HashSet<String> {
        &self.doubtful
    }

    /// `channels` were to be unsubscribed and that failed: see `doubtful`.
    fn doubt(&mut self, channels: Vec<String>) {
        for channel in channels {
            self.subscribed.remove(&channel);
            self.doubtful.insert(channel);
        }
    }

    /// A batch of requests: collect the acknowledgements, forget what the server no longer
    /// holds, then follow the topology.
    fn requested(&mut self, requests: Vec<Request>) -> Step {
        let mut effects = Vec::new();
        for request in requests {
            match request {
                Request::Sync { channel, ack } => self.acks.push(Pending { channel, ack }),
                Request::Reset => {
                    self.subscribed.clear();
                    self.doubtful.clear();
                    effects.push(Effect::Recheck);
                }
                Request::Retry => {}
                Request::Lost(channel) => {
                    self.subscribed.remove(&channel);
                    self.doubtful.remove(&channel);
                }
                Request::ResetSharded => {
                    let invalidation = &self.invalidation;
                    self.subscribed.retain(|c| c == invalidation);
                    self.doubtful.retain(|c| c == invalidation);
                }
                Request::Switched => effects.push(Effect::Switched),
            }
        }
        step(effects, Io::FollowMaster)
    }

    /// The topology is followed: compare what is wanted with what is subscribed, and start with
    /// the subscriptions.
    fn followed(&mut self, moved: bool, connected: bool, waited_on: HashSet<String>) -> Step {
        let mut effects = Vec::new();
        if moved {
            effects.push(self.moved());
        }
        let mut wanted = waited_on;
        wanted.insert(self.invalidation.clone());
        // Doubtful channels nobody wants are unsubscribed again; those wanted again are
        // subscribed (they are not in `subscribed`), either way no longer doubtful.
        let doubtful = std::mem::take(&mut self.doubtful);
        let to_drop: Vec<String> = self
            .subscribed
            .iter()
            .chain(&doubtful)
            .filter(|c| !wanted.contains(*c))
            .cloned()
            .collect();
        let to_add: Vec<String> = wanted.difference(&self.subscribed).cloned().collect();
        if !connected {
            // Nothing asked: still to be unsubscribed.
            self.doubtful = doubtful.difference(&wanted).cloned().collect();
            effects.push(self.ack(Err(NO_MASTER_YET.to_owned())));
            return step(effects, Io::Wait { retry: true });
        }
        (self.to_drop, self.drop_sharded) = self.split(to_drop);
        (self.to_add, self.add_sharded) = self.split(to_add);
        if self.to_add.is_empty() {
            return self.unsubscribe(effects);
        }
        step(effects, Io::Subscribe(self.to_add.clone()))
    }

    /// The classic subscriptions are done: the classic unsubscriptions, if any.
    fn unsubscribe(&mut self, effects: Vec<Effect>) -> Step {
        if self.to_drop.is_empty() {
            return self.sync_sharded(effects);
        }
        step(effects, Io::Unsubscribe(self.to_drop.clone()))
    }

    /// The classic side is done: the sharded side, if there is anything to do there.
    fn sync_sharded(&mut self, effects: Vec<Effect>) -> Step {
        let drop = std::mem::take(&mut self.drop_sharded);
        let add = std::mem::take(&mut self.add_sharded);
        if drop.is_empty() && add.is_empty() {
            return self.finish(effects, Ok(()));
        }
        step(effects, Io::SyncSharded { drop, add })
    }

    /// The pass ended with `result`: acknowledge it and wait — for at most [`RETRY`] after a
    /// failure. A failure the node is to blame for goes to the topology first.
    fn finish(&mut self, mut effects: Vec<Effect>, result: Result<(), L2Error>) -> Step {
        self.end_pass();
        let drop_failure = self.drop_failure.take();
        match (result, drop_failure) {
            (Ok(()), None) => {
                effects.push(Effect::Answered);
                effects.push(self.ack(Ok(())));
                // Every doubtful channel was in this pass and dropped (a failed drop is the arm
                // below): nothing to retry.
                step(effects, Io::Wait { retry: false })
            }
            // Every subscription succeeded, an unsubscription did not: the waiters are answered,
            // then the node is blamed (and the pass retried within a second).
            (Ok(()), Some(err)) => {
                effects.push(self.ack(Ok(())));
                self.failure = Some(err.to_string());
                step(effects, Io::Fail(err))
            }
            // The circuit is open: nothing was asked of this node, so it is not to blame.
            (Err(err @ L2Error::CircuitOpen { .. }), _) => {
                effects.push(self.ack(Err(err.to_string())));
                step(effects, Io::Wait { retry: true })
            }
            (Err(err), _) => {
                self.failure = Some(err.to_string());
                step(effects, Io::Fail(err))
            }
        }
    }

    /// Forgets the pass's changes still to make. Unsubscriptions it did not get to: those still
    /// in `subscribed` come up again by themselves, doubtful ones must be remembered.
    fn end_pass(&mut self) {
        let skipped = self.to_drop.drain(..).chain(self.drop_sharded.drain(..));
        let skipped: Vec<String> = skipped.filter(|c| !self.subscribed.contains(c)).collect();
        self.doubtful.extend(skipped);
        self.to_add.clear();
        self.add_sharded.clear();
    }

    /// The hub moved to another node: nothing is subscribed there yet, and notices may have
    /// been lost on the way, so every waiter resyncs.
    fn moved(&mut self) -> Effect {
        self.subscribed.clear();
        self.doubtful.clear();
        Effect::Resync
    }

    /// Answers every acknowledgement of the pass with `result`; after a failure, one that waits
    /// on a channel the server holds (subscribed in this pass, on a node that answered, or
    /// before) is answered `Ok`: its waiter need not fill on its own for a failure elsewhere.
    fn ack(&mut self, result: Result<(), String>) -> Effect {
        let acks = std::mem::take(&mut self.acks);
        let answered = acks.into_iter().map(|pending| {
            let answer = if self.holds(&pending) {
                Ok(())
            } else {
                result.clone()
            };
            (pending.ack, answer)
        });
        Effect::Ack(answered.collect())
    }

    /// Answers now, `Ok`, the acknowledgements that wait on a channel the server holds; the
    /// others (the whole pass's, those on channels still to subscribe) wait for the pass's end.
    fn ack_held(&mut self) -> Option<Effect> {
        let (held, rest): (Vec<Pending>, _) = std::mem::take(&mut self.acks)
            .into_iter()
            .partition(|pending| self.holds(pending));
        self.acks = rest;
        (!held.is_empty()).then(|| Effect::Ack(held.into_iter().map(|p| (p.ack, Ok(()))).collect()))
    }

    /// Whether `pending` waits on a channel the server holds (as far as it has confirmed).
    fn holds(&self, pending: &Pending) -> bool {
        let channel = pending.channel.as_ref();
        channel.is_some_and(|c| self.subscribed.contains(c))
    }

    /// Splits channels into the classic ones and those subscribed sharded (in a cluster, every
    /// one but the invalidation channel).
    fn split(&self, channels: Vec<String>) -> (Vec<String>, Vec<String>) {
        if !self.sharded {
            return (channels, Vec::new());
        }
        channels.into_iter().partition(|c| *c == self.invalidation)
    }
}

fn step(effects: Vec<Effect>, then: Io) -> Step {
    Step { effects, then }
}
