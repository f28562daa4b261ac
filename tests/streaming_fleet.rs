//! Streaming fills across instances: waiters on another instance tail the leader's relay log
//! while the body arrives, each event before the next is sent, and a stream cut anywhere (the
//! upstream, Redis, the leader's process) ends visibly wherever it is read. On one instance:
//! `tests/streaming.rs`.

mod support;

use support::streaming::{
    StreamingFleet, assert_cut, events, events_len, heads, lockstep, read_everywhere, spawn_reader,
};

#[tokio::test]
async fn waiters_on_another_instance_read_each_event_while_it_arrives() {
    let fleet = StreamingFleet::on_redis(2, "").await;
    let path = "/recommend?segment=remote";
    // The other instance waits on the key's channel before the upstream's head comes.
    let (writer, mut readers) = fleet.flight(path, 1, 3).await;
    assert!(
        readers[1..]
            .iter()
            .all(|r| r.cache_status.contains("collapsed")),
        "remote waiters share the leader's fill"
    );
    lockstep(writer, &mut readers, 1, 10).await;
    assert_eq!(fleet.upstream.calls(), 1, "one call for the fleet");
}

/// A lease so long that a remote tail's quiet-period read (`lease / 2`) cannot come while a
/// test runs: whatever the other instance reads, it reads because the channel rang.
const NO_QUIET_READS: &str = "lock = { lease = \"60s\", wait_timeout = \"60s\" }";

/// Every record the leader appends rings the key's channel (`relayed:<id>`), and the instance
/// that tails the log reads on each ring. Its quiet-period read is out of reach here (see
/// [`NO_QUIET_READS`]), so each event reaching the remote readers before the upstream sends
/// the next, and their clean end, can only come from the rings; and the tailing instance reads
/// the log about once per record, not once in a while. (The rings after the announcement used
/// to be dropped unread by the hub: the tail read only on its timer and on `stored`.)
#[tokio::test]
async fn a_remote_tail_reads_on_every_ring_not_on_its_quiet_timer() {
    let fleet = StreamingFleet::on_redis(2, NO_QUIET_READS).await;
    let path = "/recommend?segment=rings";
    let leader = fleet.reader(0, path);
    let writer = fleet.upstream.next_call().await;
    let remote: Vec<_> = (0..2).map(|_| fleet.reader(1, path)).collect();
    fleet.other_instance_waits(path).await;
    let before = fleet.redis().commandstats().await.calls("xread");
    writer.event(1).await;
    let mut readers = vec![leader.await.expect("leader")];
    readers.extend(heads(remote).await);
    lockstep(writer, &mut readers, 1, 10).await;
    let xreads = fleet.redis().commandstats().await.calls("xread") - before;
    assert!(
        xreads >= 10,
        "one log read per ring: {xreads} XREADs for 10 data records and the end"
    );
    assert_eq!(fleet.upstream.calls(), 1, "one call for the fleet");
    fleet.assert_tails(1, "complete").await;
}

/// An instance that starts waiting after the fill was announced missed the `streaming` notice;
/// the next `relayed` ring (the log is written, since another instance heard the announcement)
/// tells it of the fill, and it tails the log from byte 0 while the body still arrives instead
/// of waiting for the stored answer.
#[tokio::test]
async fn an_instance_that_waits_after_the_announcement_tails_from_the_next_ring() {
    let fleet = StreamingFleet::on_redis(3, NO_QUIET_READS).await;
    let path = "/recommend?segment=late-instance";
    let (writer, mut readers) = fleet.flight(path, 1, 1).await;
    read_everywhere(&mut readers, 1).await;
    // The third instance starts waiting once the fill was announced.
    let late = fleet.reader(2, path);
    fleet.instances_wait(path, 2).await;
    writer.event(2).await;
    readers.push(late.await.expect("late instance"));
    assert!(
        readers[2].cache_status.contains("collapsed"),
        "{}",
        readers[2].cache_status
    );
    lockstep(writer, &mut readers, 2, 6).await;
    assert_eq!(fleet.upstream.calls(), 1, "one call for the fleet");
}

#[tokio::test]
async fn a_cut_stream_ends_visibly_on_other_instances_too() {
    let fleet = StreamingFleet::on_redis(2, "").await;
    let path = "/recommend?segment=remote-cut";
    let (writer, mut readers) = fleet.flight(path, 1, 1).await;
    for n in 2..=3 {
        writer.event(n).await;
    }
    read_everywhere(&mut readers, 3).await;
    writer.cut().await;
    assert_cut(&mut readers).await;
    fleet.assert_nothing_stored(1).await;
    fleet.assert_tails(1, "aborted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_stream_cuts_remote_readers_visibly_and_local_ones_read_on() {
    let mut fleet = StreamingFleet::on_redis(2, "").await;
    let path = "/recommend?segment=redis-dies";
    let leader = fleet.reader(0, path);
    let writer = fleet.upstream.next_call().await;
    let remote = fleet.reader(1, path);
    fleet.other_instance_waits(path).await;
    writer.event(1).await;
    let (mut leader, mut remote) = (leader.await.expect("leader"), remote.await.expect("remote"));
    leader.read_to(events_len(1)).await.expect("first event");
    remote
        .read_to(events_len(1))
        .await
        .expect("first event elsewhere");

    fleet.kill_redis();
    for n in 2..=4 {
        writer.event(n).await;
    }
    drop(writer);
    leader
        .finish()
        .await
        .expect("the leader's instance reads the upstream to a clean end");
    assert_eq!(leader.read, events(4));
    let cut = remote.finish().await;
    assert!(
        cut.is_err(),
        "the remote reader must not end cleanly: {cut:?}"
    );
    assert!(
        remote.read.len() < events_len(4),
        "never a silently short body that looks complete"
    );
    assert_eq!(fleet.upstream.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_process_killed_mid_stream_cuts_remote_readers_and_the_next_request_fills_again()
{
    let fleet = StreamingFleet::on_redis(1, "").await;
    let mut leader_process = support::CorralProcess::start(&support::corral::config_text(
        "",
        Some(&fleet.redis().url()),
        &support::corral::recommend_route(&fleet.upstream.url, ""),
    ))
    .await;
    let path = "/recommend?segment=leader-dies";
    let leader = spawn_reader(leader_process.url(path));
    let writer = fleet.upstream.next_call().await;
    let remote = fleet.reader(0, path);
    fleet.other_instance_waits(path).await;
    writer.event(1).await;
    let mut remote = remote.await.expect("remote");
    remote
        .read_to(events_len(1))
        .await
        .expect("first event elsewhere");
    drop(leader);

    leader_process.kill();
    let cut = remote.finish().await;
    assert!(
        cut.is_err(),
        "a relay whose leader died must not end cleanly: {cut:?}"
    );
    drop(writer);

    // The lock lapses with its lease; the next request fills again.
    fleet.fills_again(0, path).await;
    assert_eq!(fleet.upstream.calls(), 2);
}
