//! Failures that fail nobody, or only those they concern: an unsubscription nobody waits on, a
//! subscription on another node of a cluster.

use super::*;

#[test]
fn a_failed_unsubscription_fails_no_waiter_and_is_tried_again_within_a_second() {
    let mut r = settled(&["fill:a"]);
    let (request, _acked) = sync();
    r.on(Event::Requests(vec![request]));
    r.on(followed(&["fill:b"]));
    let step = r.on(Event::Subscribed(Ok(())));
    assert!(matches!(step.then, Io::Unsubscribe(_)), "{step:?}");
    // The pass's request is answered all the same.
    let step = r.on(Event::Unsubscribed(Err(late())));
    assert_eq!(acked(&step), Some((1, Ok(()))));
    // Then the node is blamed, as for any failure (behind sentinels: the master is looked for
    // again), and the pass retried within a second.
    assert!(!has(&step, |e| matches!(e, Effect::Answered)));
    assert!(matches!(step.then, Io::Fail(_)), "{step:?}");
    let step = r.on(Event::FailedOver { moved: false });
    assert_eq!(acked(&step), Some((0, Ok(()))), "nobody is left to fail");
    assert!(matches!(step.then, Io::Wait { retry: true }), "{step:?}");
    assert_eq!(r.subscribed(), &set(&[INVALIDATION, "fill:b"]));
    assert_eq!(r.doubtful(), &set(&["fill:a"]));
    // The retry unsubscribes it again; once that answers, nothing is left to retry.
    r.on(Event::Requests(vec![Request::Retry]));
    let step = r.on(followed(&["fill:b"]));
    assert_eq!(unsubscribing(&step), ["fill:a"]);
    let step = r.on(Event::Unsubscribed(Ok(())));
    assert!(matches!(step.then, Io::Wait { retry: false }), "{step:?}");
    assert!(r.doubtful().is_empty());
    assert_eq!(r.subscribed(), &set(&[INVALIDATION, "fill:b"]));
}

/// A reconciler whose drop of `fill:a` (nobody waits on it any more) failed, the node blamed:
/// `fill:a` is doubtful.
fn with_fill_a_doubtful() -> Reconciler {
    let mut r = settled(&["fill:a"]);
    r.on(Event::Requests(vec![Request::Retry]));
    r.on(followed(&[]));
    let step = r.on(Event::Unsubscribed(Err(late())));
    assert!(matches!(step.then, Io::Fail(_)), "{step:?}");
    r.on(Event::FailedOver { moved: false });
    assert_eq!(r.doubtful(), &set(&["fill:a"]));
    r
}

#[test]
fn a_channel_whose_unsubscription_failed_is_subscribed_again_when_waited_on() {
    let mut r = with_fill_a_doubtful();
    // The server most likely dropped it (the command was sent): a new waiter on it must not be
    // told it is subscribed without asking.
    let (request, _acked) = sync();
    r.on(Event::Requests(vec![request]));
    let step = r.on(followed(&["fill:a"]));
    assert_eq!(subscribing(&step), ["fill:a"]);
    let step = r.on(Event::Subscribed(Ok(())));
    assert_eq!(acked(&step), Some((1, Ok(()))));
    assert!(matches!(step.then, Io::Wait { retry: false }), "{step:?}");
    assert!(r.doubtful().is_empty());
}

#[test]
fn an_unsubscription_refused_by_the_open_circuit_keeps_the_channel_and_fails_the_rest_of_the_pass()
{
    let mut r = settled(&["fill:a"]);
    let (waiter, _w) = sync_on("fill:b");
    let (whole_pass, _p) = sync();
    r.on(Event::Requests(vec![waiter, whole_pass]));
    r.on(followed(&["fill:b"]));
    // The waiter on fill:b was answered once fill:b was confirmed; then the circuit opens.
    let step = r.on(Event::Subscribed(Ok(())));
    assert_eq!(acked(&step), Some((1, Ok(()))));
    let step = r.on(Event::Unsubscribed(Err(L2Error::CircuitOpen {
        op: "UNSUBSCRIBE",
    })));
    let (_, result) = acked(&step).expect("acknowledged");
    assert!(result.is_err(), "the request for the whole pass is refused");
    assert!(matches!(step.then, Io::Wait { retry: true }));
    assert_eq!(r.subscribed(), &set(&[INVALIDATION, "fill:a", "fill:b"]));
    // The next pass drops it.
    r.on(Event::Requests(vec![Request::Retry]));
    let step = r.on(followed(&["fill:b"]));
    assert_eq!(unsubscribing(&step), ["fill:a"]);
}

/// In a cluster: the invalidation channel and `channels` subscribed.
fn settled_in_a_cluster(channels: &[&str]) -> Reconciler {
    let mut r = Reconciler::new(INVALIDATION.to_owned(), true);
    r.on(Event::Requests(vec![Request::Retry]));
    r.on(followed(channels));
    r.on(Event::Subscribed(Ok(())));
    r.on(sharded(channels, &[], Ok(())));
    assert_eq!(r.subscribed().len(), channels.len() + 1);
    r
}

#[test]
fn in_a_cluster_a_failed_sunsubscribe_fails_no_waiter() {
    let mut r = settled_in_a_cluster(&["fill:a"]);
    let (request, _acked) = sync();
    r.on(Event::Requests(vec![request]));
    let step = r.on(followed(&["fill:b"]));
    match &step.then {
        Io::SyncSharded { drop, add } => {
            assert_eq!(drop, &vec!["fill:a".to_owned()]);
            assert_eq!(add, &vec!["fill:b".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
    let step = r.on(sharded(&["fill:b"], &["fill:a"], Ok(())));
    assert_eq!(acked(&step), Some((1, Ok(()))));
    assert!(matches!(step.then, Io::Fail(_)), "{step:?}");
    let step = r.on(Event::FailedOver { moved: false });
    assert!(matches!(step.then, Io::Wait { retry: true }), "{step:?}");
    assert_eq!(r.subscribed(), &set(&[INVALIDATION, "fill:b"]));
    assert_eq!(r.doubtful(), &set(&["fill:a"]));
}

#[test]
fn a_doubtful_channel_stays_doubtful_when_a_pass_fails_before_unsubscribing_it() {
    let mut r = settled_in_a_cluster(&["fill:a"]);
    r.on(Event::Requests(vec![Request::Retry]));
    r.on(followed(&[]));
    r.on(sharded(&[], &["fill:a"], Ok(())));
    r.on(Event::FailedOver { moved: false });
    assert_eq!(r.doubtful(), &set(&["fill:a"]));
    // The next pass must subscribe the invalidation channel first, and that fails: the sharded
    // side is never reached.
    r.on(Event::Requests(vec![Request::Lost(
        INVALIDATION.to_owned(),
    )]));
    let step = r.on(followed(&[]));
    assert!(matches!(step.then, Io::Subscribe(_)), "{step:?}");
    let step = r.on(Event::Subscribed(Err(down())));
    assert!(matches!(step.then, Io::Fail(_)));
    r.on(Event::FailedOver { moved: false });
    assert_eq!(r.doubtful(), &set(&["fill:a"]));
    // Once the node answers, it is unsubscribed.
    r.on(Event::Requests(vec![Request::Retry]));
    r.on(followed(&[]));
    let step = r.on(Event::Subscribed(Ok(())));
    match &step.then {
        Io::SyncSharded { drop, add } => {
            assert_eq!(drop, &vec!["fill:a".to_owned()]);
            assert!(add.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_new_connection_has_nothing_doubtful() {
    let mut r = with_fill_a_doubtful();
    r.on(Event::Requests(vec![Request::Reset]));
    assert!(r.doubtful().is_empty());
    let step = r.on(followed(&[]));
    assert_eq!(subscribing(&step), [INVALIDATION]);
}

#[test]
fn in_a_cluster_a_failed_ssubscribe_fails_only_the_waiters_on_its_channel() {
    let mut r = settled_in_a_cluster(&["fill:a"]);
    let (on_a, _a) = sync_on("fill:a");
    let (on_b, _b) = sync_on("fill:b");
    let (on_c, _c) = sync_on("fill:c");
    let (whole, _w) = sync();
    r.on(Event::Requests(vec![on_a, on_b, on_c, whole]));
    let step = r.on(followed(&["fill:a", "fill:b", "fill:c"]));
    assert!(matches!(step.then, Io::SyncSharded { .. }), "{step:?}");
    // fill:b's node answered, fill:c's did not.
    let step = r.on(sharded(&["fill:b"], &[], Err(down())));
    assert!(matches!(step.then, Io::Fail(_)));
    let step = r.on(Event::FailedOver { moved: false });
    let answers = answers(&step).expect("acknowledged");
    assert_eq!(
        answers[..2],
        [Ok(()), Ok(())],
        "held before, and subscribed now"
    );
    assert!(answers[2].is_err(), "fill:c: {answers:?}");
    assert!(answers[3].is_err(), "the whole pass: {answers:?}");
    assert!(matches!(step.then, Io::Wait { retry: true }));
}

#[test]
fn a_failure_that_moves_to_another_node_fails_every_waiter() {
    let mut r = settled_in_a_cluster(&["fill:a"]);
    let (on_a, _a) = sync_on("fill:a");
    r.on(Event::Requests(vec![on_a]));
    r.on(followed(&["fill:a", "fill:b"]));
    r.on(sharded(&[], &[], Err(down())));
    // The new node holds nothing: fill:a is no longer subscribed.
    let step = r.on(Event::FailedOver { moved: true });
    let (count, result) = acked(&step).expect("acknowledged");
    assert_eq!(count, 1);
    assert!(result.is_err());
}

#[test]
fn a_failed_unsubscription_that_moves_to_another_node_resyncs_and_forgets_the_doubt() {
    let mut r = settled(&["fill:a", "fill:b"]);
    let (request, _acked) = sync();
    r.on(Event::Requests(vec![request]));
    r.on(followed(&["fill:b"]));
    let step = r.on(Event::Unsubscribed(Err(late())));
    // Nothing to subscribe: the pass ends, its waiters answered, the node blamed.
    assert_eq!(acked(&step), Some((1, Ok(()))));
    assert!(matches!(step.then, Io::Fail(_)), "{step:?}");
    let step = r.on(Event::FailedOver { moved: true });
    assert!(has(&step, |e| matches!(e, Effect::Resync)));
    assert!(r.subscribed().is_empty());
    assert!(r.doubtful().is_empty());
}

#[test]
fn a_pass_cut_short_by_a_new_master_keeps_its_doubtful_channels() {
    let mut r = with_fill_a_doubtful();
    // The next pass would drop it after subscribing fill:b, but the sentinels announce a new
    // master first; they still name the same one.
    let (waiter, _w) = sync_on("fill:b");
    r.on(Event::Requests(vec![waiter]));
    let step = r.on(followed(&["fill:b"]));
    assert_eq!(subscribing(&step), ["fill:b"]);
    let step = r.on(Event::MasterSwitched);
    assert!(matches!(step.then, Io::FollowMaster), "{step:?}");
    assert_eq!(r.doubtful(), &set(&["fill:a"]));
    let step = r.on(followed(&["fill:b"]));
    assert_eq!(subscribing(&step), ["fill:b"]);
    let step = r.on(Event::Subscribed(Ok(())));
    assert_eq!(acked(&step), Some((1, Ok(()))));
    assert_eq!(unsubscribing(&step), ["fill:a"]);
}
