//! Every transition of the reconciler: events in, actions out.

use super::*;

mod failures;

const INVALIDATION: &str = "corral:test:invalidate";

fn set(channels: &[&str]) -> HashSet<String> {
    channels.iter().map(|c| (*c).to_owned()).collect()
}

fn sorted(channels: &[String]) -> Vec<String> {
    let mut channels = channels.to_vec();
    channels.sort();
    channels
}

fn sync() -> (Request, oneshot::Receiver<Result<(), String>>) {
    let (ack, acked) = oneshot::channel();
    (Request::Sync { channel: None, ack }, acked)
}

/// A waiter's request: acknowledged by `channel`'s own subscription.
fn sync_on(channel: &str) -> (Request, oneshot::Receiver<Result<(), String>>) {
    let (ack, acked) = oneshot::channel();
    let channel = Some(channel.to_owned());
    (Request::Sync { channel, ack }, acked)
}

/// The topology followed to the same node, `waited_on` waited on.
fn followed(waited_on: &[&str]) -> Event {
    follow(false, waited_on)
}

/// The topology followed to another node (nothing subscribed there), `waited_on` waited on.
fn moved_to(waited_on: &[&str]) -> Event {
    follow(true, waited_on)
}

fn follow(moved: bool, waited_on: &[&str]) -> Event {
    Event::Followed {
        moved,
        connected: true,
        waited_on: set(waited_on),
    }
}

fn down() -> L2Error {
    L2Error::Pubsub("connection refused".to_owned())
}

/// An unsubscription with no answer within its budget (Redis slow under a burst).
fn late() -> L2Error {
    L2Error::Pubsub("redis UNSUBSCRIBE: no answer within 1s".to_owned())
}

/// The sharded side answered: `added` subscribed, `undropped` not unsubscribed (unanswered:
/// [`late`]), nothing dropped; `result`: the subscriptions' last failure.
fn sharded(added: &[&str], undropped: &[&str], result: Result<(), L2Error>) -> Event {
    let owned = |channels: &[&str]| channels.iter().map(|c| (*c).to_owned()).collect();
    Event::ShardedSynced {
        dropped: Vec::new(),
        undropped: owned(undropped),
        drop_failure: (!undropped.is_empty()).then(late),
        added: owned(added),
        result,
    }
}

/// What each acknowledgement a step answers is answered (those on held channels first, then
/// the rest of the pass's).
fn answers(step: &Step) -> Option<Vec<Result<(), String>>> {
    let mut acks = step.effects.iter().filter_map(|effect| match effect {
        Effect::Ack(acks) => Some(acks.iter().map(|(_, result)| result.clone())),
        _ => None,
    });
    let first = acks.next()?;
    Some(first.chain(acks.flatten()).collect())
}

/// How many acknowledgements a step answers, all with the same result: which.
fn acked(step: &Step) -> Option<(usize, Result<(), String>)> {
    let answers = answers(step)?;
    let first = answers.first().cloned().unwrap_or(Ok(()));
    assert!(answers.iter().all(|a| *a == first), "{answers:?}");
    Some((answers.len(), first))
}

/// The channels a step SUBSCRIBEs next, sorted; any other step fails the test.
fn subscribing(step: &Step) -> Vec<String> {
    match &step.then {
        Io::Subscribe(channels) => sorted(channels),
        other => panic!("{other:?}"),
    }
}

/// The channels a step UNSUBSCRIBEs next, sorted; any other step fails the test.
fn unsubscribing(step: &Step) -> Vec<String> {
    match &step.then {
        Io::Unsubscribe(channels) => sorted(channels),
        other => panic!("{other:?}"),
    }
}

fn has(step: &Step, wanted: fn(&Effect) -> bool) -> bool {
    step.effects.iter().any(wanted)
}

/// A reconciler on one server that has subscribed the invalidation channel and `channels`.
fn settled(channels: &[&str]) -> Reconciler {
    let mut r = Reconciler::new(INVALIDATION.to_owned(), false);
    let (request, _acked) = sync();
    r.on(Event::Requests(vec![request]));
    let step = r.on(followed(channels));
    assert!(matches!(step.then, Io::Subscribe(_)), "{step:?}");
    let step = r.on(Event::Subscribed(Ok(())));
    assert!(matches!(step.then, Io::Wait { retry: false }), "{step:?}");
    r
}

#[test]
fn it_starts_by_waiting_for_a_request() {
    let r = Reconciler::new(INVALIDATION.to_owned(), false);
    let step = r.start();
    assert!(step.effects.is_empty());
    assert!(matches!(step.then, Io::Wait { retry: false }));
}

#[test]
fn requests_are_taken_as_one_batch_then_the_topology_is_followed() {
    let mut r = Reconciler::new(INVALIDATION.to_owned(), false);
    let (one, _a) = sync();
    let (two, _b) = sync();
    let step = r.on(Event::Requests(vec![one, Request::Retry, two]));
    assert!(step.effects.is_empty(), "{step:?}");
    assert!(matches!(step.then, Io::FollowMaster));
    // Both acknowledgements are answered by the one pass.
    let step = r.on(followed(&[]));
    let step = match step.then {
        Io::Subscribe(_) => r.on(Event::Subscribed(Ok(()))),
        other => panic!("{other:?}"),
    };
    assert_eq!(acked(&step), Some((2, Ok(()))));
}

#[test]
fn the_first_pass_subscribes_the_invalidation_channel_and_the_waited_on_ones() {
    let mut r = Reconciler::new(INVALIDATION.to_owned(), false);
    let (request, _acked) = sync();
    r.on(Event::Requests(vec![request]));
    let step = r.on(followed(&["fill:a"]));
    assert_eq!(subscribing(&step), ["corral:test:invalidate", "fill:a"]);
    let step = r.on(Event::Subscribed(Ok(())));
    assert!(has(&step, |e| matches!(e, Effect::InvalidationSubscribed)));
    assert!(has(&step, |e| matches!(e, Effect::Answered)));
    assert_eq!(acked(&step), Some((1, Ok(()))));
    assert!(matches!(step.then, Io::Wait { retry: false }));
    assert_eq!(r.subscribed(), &set(&[INVALIDATION, "fill:a"]));
}

#[test]
fn a_pass_with_nothing_to_change_answers_at_once() {
    let mut r = settled(&["fill:a"]);
    let (request, _acked) = sync();
    r.on(Event::Requests(vec![request]));
    let step = r.on(followed(&["fill:a"]));
    assert!(has(&step, |e| matches!(e, Effect::Answered)));
    assert_eq!(acked(&step), Some((1, Ok(()))));
    assert!(matches!(step.then, Io::Wait { retry: false }));
}

#[test]
fn new_channels_are_subscribed_and_their_waiters_answered_before_old_ones_are_dropped() {
    let mut r = settled(&["fill:a"]);
    let (waiter, _w) = sync_on("fill:b");
    let (whole_pass, _p) = sync();
    r.on(Event::Requests(vec![waiter, whole_pass]));
    let step = r.on(followed(&["fill:b"]));
    assert_eq!(subscribing(&step), ["fill:b"]);
    // The waiter on fill:b is answered as soon as fill:b is confirmed, before the drop; the
    // request that waits for the whole pass is not.
    let step = r.on(Event::Subscribed(Ok(())));
    assert_eq!(acked(&step), Some((1, Ok(()))));
    assert!(!has(&step, |e| matches!(e, Effect::InvalidationSubscribed)));
    assert_eq!(unsubscribing(&step), ["fill:a"]);
    assert_eq!(r.subscribed(), &set(&[INVALIDATION, "fill:a", "fill:b"]));
    let step = r.on(Event::Unsubscribed(Ok(())));
    assert_eq!(acked(&step), Some((1, Ok(()))));
    assert!(has(&step, |e| matches!(e, Effect::Answered)));
    assert!(matches!(step.then, Io::Wait { retry: false }));
    assert_eq!(r.subscribed(), &set(&[INVALIDATION, "fill:b"]));
}

#[test]
fn a_subscribe_cut_short_by_a_new_master_starts_the_pass_again_there_and_keeps_its_waiters() {
    let mut r = settled(&[]);
    let (waiter, _w) = sync_on("fill:a");
    r.on(Event::Requests(vec![waiter]));
    let step = r.on(followed(&["fill:a"]));
    assert!(matches!(step.then, Io::Subscribe(_)), "{step:?}");
    let step = r.on(Event::MasterSwitched);
    assert!(has(&step, |e| matches!(e, Effect::Switched)));
    assert_eq!(
        answers(&step),
        None,
        "the waiter is not answered, nor failed"
    );
    assert!(matches!(step.then, Io::FollowMaster), "{step:?}");
    // On the new master: every waiter resyncs, everything is subscribed there, the waiter is
    // answered.
    let step = r.on(moved_to(&["fill:a"]));
    assert!(has(&step, |e| matches!(e, Effect::Resync)));
    assert_eq!(subscribing(&step), [INVALIDATION, "fill:a"]);
    let step = r.on(Event::Subscribed(Ok(())));
    assert_eq!(acked(&step), Some((1, Ok(()))));
    assert!(matches!(step.then, Io::Wait { retry: false }), "{step:?}");
}

#[test]
fn an_unsubscription_alone_ends_the_pass() {
    let mut r = settled(&["fill:a"]);
    r.on(Event::Requests(vec![Request::Retry]));
    let step = r.on(followed(&[]));
    assert!(matches!(step.then, Io::Unsubscribe(_)));
    let step = r.on(Event::Unsubscribed(Ok(())));
    assert!(has(&step, |e| matches!(e, Effect::Answered)));
    assert!(matches!(step.then, Io::Wait { retry: false }));
    assert_eq!(r.subscribed(), &set(&[INVALIDATION]));
}

#[test]
fn without_a_node_the_pass_is_refused_and_retried() {
    let mut r = Reconciler::new(INVALIDATION.to_owned(), false);
    let (request, _acked) = sync();
    r.on(Event::Requests(vec![request]));
    let step = r.on(Event::Followed {
        moved: false,
        connected: false,
        waited_on: set(&["fill:a"]),
    });
    assert_eq!(acked(&step), Some((1, Err(NO_MASTER_YET.to_owned()))));
    assert!(matches!(step.then, Io::Wait { retry: true }));
    assert!(r.subscribed().is_empty());
}

#[test]
fn a_failed_subscription_goes_to_the_topology_then_is_refused_and_retried() {
    let mut r = Reconciler::new(INVALIDATION.to_owned(), false);
    let (request, _acked) = sync();
    r.on(Event::Requests(vec![request]));
    r.on(followed(&["fill:a"]));
    let step = r.on(Event::Subscribed(Err(down())));
    assert!(step.effects.is_empty(), "{step:?}");
    assert!(matches!(step.then, Io::Fail(L2Error::Pubsub(_))));
    let step = r.on(Event::FailedOver { moved: false });
    let (count, result) = acked(&step).expect("acknowledged");
    assert_eq!(count, 1);
    assert!(result.is_err_and(|reason| reason.contains("connection refused")));
    assert!(!has(&step, |e| matches!(e, Effect::Resync)));
    assert!(matches!(step.then, Io::Wait { retry: true }));
    assert!(r.subscribed().is_empty());
}

#[test]
fn an_open_circuit_is_refused_and_retried_without_blaming_the_node() {
    let mut r = Reconciler::new(INVALIDATION.to_owned(), false);
    let (request, _acked) = sync();
    r.on(Event::Requests(vec![request]));
    r.on(followed(&[]));
    let step = r.on(Event::Subscribed(Err(L2Error::CircuitOpen {
        op: "SUBSCRIBE",
    })));
    let (_, result) = acked(&step).expect("acknowledged");
    assert!(result.is_err());
    assert!(!has(&step, |e| matches!(e, Effect::Answered)));
    assert!(matches!(step.then, Io::Wait { retry: true }));
}

#[test]
fn a_failure_that_moves_to_another_node_resyncs_and_subscribes_everything_there() {
    let mut r = settled(&["fill:a"]);
    r.on(Event::Requests(vec![Request::Retry]));
    r.on(followed(&["fill:a", "fill:b"]));
    r.on(Event::Subscribed(Err(down())));
    let step = r.on(Event::FailedOver { moved: true });
    assert!(has(&step, |e| matches!(e, Effect::Resync)));
    assert!(r.subscribed().is_empty());
    r.on(Event::Requests(vec![Request::Retry]));
    let step = r.on(followed(&["fill:a", "fill:b"]));
    assert_eq!(subscribing(&step).len(), 3);
}

#[test]
fn following_the_master_to_another_node_resyncs_and_subscribes_everything_there() {
    let mut r = settled(&["fill:a"]);
    r.on(Event::Requests(vec![Request::Retry]));
    let step = r.on(moved_to(&["fill:a"]));
    assert!(has(&step, |e| matches!(e, Effect::Resync)));
    assert_eq!(subscribing(&step), [INVALIDATION, "fill:a"]);
    let step = r.on(Event::Subscribed(Ok(())));
    assert!(has(&step, |e| matches!(e, Effect::InvalidationSubscribed)));
}

#[test]
fn a_dropped_connection_forgets_every_subscription_and_has_the_sentinels_asked() {
    let mut r = settled(&["fill:a"]);
    let step = r.on(Event::Requests(vec![Request::Reset]));
    assert!(has(&step, |e| matches!(e, Effect::Recheck)));
    assert!(r.subscribed().is_empty());
    let step = r.on(followed(&["fill:a"]));
    assert_eq!(subscribing(&step).len(), 2);
}

#[test]
fn a_switch_of_master_has_the_sentinels_asked_at_once() {
    let mut r = settled(&[]);
    let step = r.on(Event::Requests(vec![Request::Switched]));
    assert!(has(&step, |e| matches!(e, Effect::Switched)));
    assert!(matches!(step.then, Io::FollowMaster));
    assert_eq!(r.subscribed(), &set(&[INVALIDATION]));
}

#[test]
fn a_lost_sharded_subscription_is_subscribed_again() {
    let mut r = settled(&["fill:a", "fill:b"]);
    r.on(Event::Requests(vec![Request::Lost("fill:a".to_owned())]));
    assert_eq!(r.subscribed(), &set(&[INVALIDATION, "fill:b"]));
    let step = r.on(followed(&["fill:a", "fill:b"]));
    assert_eq!(subscribing(&step), ["fill:a"]);
}

#[test]
fn a_reset_of_the_sharded_side_keeps_the_invalidation_channel() {
    let mut r = settled(&["fill:a", "fill:b"]);
    r.on(Event::Requests(vec![Request::ResetSharded]));
    assert_eq!(r.subscribed(), &set(&[INVALIDATION]));
}

#[test]
fn in_a_cluster_fill_channels_are_sharded_and_the_invalidation_channel_classic() {
    let mut r = Reconciler::new(INVALIDATION.to_owned(), true);
    r.on(Event::Requests(vec![Request::Retry]));
    let step = r.on(followed(&["fill:a", "fill:b"]));
    assert_eq!(subscribing(&step), [INVALIDATION]);
    let step = r.on(Event::Subscribed(Ok(())));
    assert!(has(&step, |e| matches!(e, Effect::InvalidationSubscribed)));
    match &step.then {
        Io::SyncSharded { drop, add } => {
            assert!(drop.is_empty());
            assert_eq!(sorted(add), vec!["fill:a", "fill:b"]);
        }
        other => panic!("{other:?}"),
    }
    let step = r.on(sharded(&["fill:a", "fill:b"], &[], Ok(())));
    assert!(has(&step, |e| matches!(e, Effect::Answered)));
    assert!(matches!(step.then, Io::Wait { retry: false }));
    assert_eq!(r.subscribed(), &set(&[INVALIDATION, "fill:a", "fill:b"]));
}

#[test]
fn in_a_cluster_the_sharded_subscriptions_that_succeeded_are_kept_when_others_fail() {
    let mut r = Reconciler::new(INVALIDATION.to_owned(), true);
    r.on(Event::Requests(vec![Request::Retry]));
    r.on(followed(&["fill:a", "fill:b"]));
    r.on(Event::Subscribed(Ok(())));
    let step = r.on(sharded(&["fill:a"], &[], Err(down())));
    assert!(matches!(step.then, Io::Fail(_)));
    assert_eq!(r.subscribed(), &set(&[INVALIDATION, "fill:a"]));
    r.on(Event::FailedOver { moved: false });
    r.on(Event::Requests(vec![Request::Retry]));
    let step = r.on(followed(&["fill:b"]));
    match &step.then {
        Io::SyncSharded { drop, add } => {
            assert_eq!(drop, &vec!["fill:a".to_owned()]);
            assert_eq!(add, &vec!["fill:b".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
}
