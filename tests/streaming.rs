//! Streaming fills on one instance: every requester of a key reads the answer while the leader
//! receives it, and nothing cut short looks complete or is stored. Across instances:
//! `tests/streaming_fleet.rs`.
//!
//! The upstream here is a real hyper server whose answer body the test writes event by event
//! ([`StreamingUpstream`](support::streaming::StreamingUpstream)), so a test orders events instead
//! of timing them: it sends one event, reads it from every client, and only then sends the next —
//! which proves that nobody waits for the end of the body.

mod support;

use bytes::Bytes;
use support::streaming::{
    Reader, StreamingFleet, assert_cut, events, events_len, heads, lockstep, read_everywhere,
};

#[tokio::test]
async fn the_leader_and_its_waiters_read_every_event_before_the_next_is_sent() {
    let fleet = StreamingFleet::alone("").await;
    let path = "/recommend?segment=sse";

    // The leader's request reaches the upstream; five more join its flight.
    let (writer, mut readers) = fleet.flight(path, 0, 5).await;
    assert!(readers.iter().all(|r| r.status == 200));
    assert!(
        readers[0].cache_status.contains("fwd=miss"),
        "{}",
        readers[0].cache_status
    );
    assert!(
        readers[1..]
            .iter()
            .all(|r| r.cache_status.contains("collapsed")),
        "waiters share the leader's fill"
    );
    // Each event reaches every reader before the upstream writes the next one.
    lockstep(writer, &mut readers, 1, 20).await;
    assert_eq!(
        fleet.upstream.calls(),
        1,
        "one upstream call for the six requests"
    );

    // Once whole, the answer was stored: the next request is a hit with the same bytes.
    fleet
        .stored(0, path, 20, "the streamed answer is stored")
        .await;
    assert_eq!(fleet.upstream.calls(), 1);
}

#[tokio::test]
async fn a_late_joiner_reads_from_byte_zero_then_tails() {
    let fleet = StreamingFleet::alone("").await;
    let path = "/recommend?segment=late";
    let leader = fleet.reader(0, path);
    let writer = fleet.upstream.next_call().await;
    for n in 1..=3 {
        writer.event(n).await;
    }
    let mut leader = leader.await.expect("leader");
    leader.read_to(events_len(3)).await.expect("three events");
    // Joins after three events: it gets them at once, then the rest as they come.
    let mut late = Reader::get(&fleet.url(0, path)).await;
    late.read_to(events_len(3))
        .await
        .expect("the first three at once");
    writer.event(4).await;
    late.read_to(events_len(4))
        .await
        .expect("the fourth as it comes");
    drop(writer);
    late.finish().await.expect("clean end");
    leader.finish().await.expect("clean end");
    assert_eq!(late.read, events(4));
    assert_eq!(leader.read, events(4));
    assert_eq!(fleet.upstream.calls(), 1);
}

#[tokio::test]
async fn a_cut_stream_fails_every_reader_and_is_never_stored() {
    let fleet = StreamingFleet::on_redis(1, "").await;
    let path = "/recommend?segment=cut";
    let (writer, mut readers) = fleet.flight(path, 0, 1).await;
    for n in 2..=5 {
        writer.event(n).await;
    }
    read_everywhere(&mut readers, 5).await;
    writer.cut().await;
    assert_cut(&mut readers).await;
    fleet.assert_nothing_stored(0).await;
    // The next request fills again.
    fleet.fills_again(0, path).await;
    assert_eq!(fleet.upstream.calls(), 2);
}

#[tokio::test]
async fn the_fill_runs_on_when_the_leaders_client_leaves_and_a_waiters_leaving_holds_nobody() {
    let fleet = StreamingFleet::alone("").await;
    let path = "/recommend?segment=leave";
    let leader = fleet.reader(0, path);
    let writer = fleet.upstream.next_call().await;
    let (a, b) = (fleet.reader(0, path), fleet.reader(0, path));
    writer.event(1).await;
    let (leader, mut a, b) = (
        leader.await.expect("leader"),
        a.await.expect("a"),
        b.await.expect("b"),
    );
    a.read_to(events_len(1)).await.expect("first event");
    // The leader's client and one waiter's client go away mid-stream.
    drop(leader);
    drop(b);
    for n in 2..=10 {
        writer.event(n).await;
    }
    drop(writer);
    a.finish()
        .await
        .expect("the remaining waiter reads to a clean end");
    assert_eq!(a.read, events(10));
    assert_eq!(fleet.upstream.calls(), 1);
    fleet
        .stored(0, path, 10, "stored though its leader left")
        .await;
}

#[tokio::test]
async fn a_body_over_the_store_limit_streams_to_every_reader_and_is_not_stored() {
    let fleet = StreamingFleet::alone("max_entry_size = \"64KiB\"").await;
    let path = "/recommend?segment=big";
    let leader = fleet.reader(0, path);
    let writer = fleet.upstream.next_call().await;
    let waiter = fleet.reader(0, path);
    let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
    assert!(writer.bytes(chunk.clone()).await);
    let mut readers = [leader.await.expect("leader"), waiter.await.expect("waiter")];
    // 4 MiB, sixty-four times the store limit, read by both as it comes.
    let chunks = 256;
    let feed = tokio::spawn(async move {
        for _ in 1..chunks {
            if !writer.bytes(chunk.clone()).await {
                return false;
            }
        }
        true
    });
    let [leader, waiter] = &mut readers;
    let (l, w) = tokio::join!(leader.finish(), waiter.finish());
    assert!(
        feed.await.expect("feed"),
        "corral read the whole upstream body"
    );
    l.expect("the leader reads to a clean end");
    w.expect("the waiter reads to a clean end");
    assert_eq!(leader.read.len(), chunks * 16 * 1024);
    assert_eq!(waiter.read.len(), chunks * 16 * 1024);
    assert_eq!(fleet.upstream.calls(), 1);
    // Not stored: the next request is a fresh fill.
    fleet.fills_again(0, path).await;
    assert_eq!(fleet.upstream.calls(), 2);
}

#[tokio::test]
async fn identical_llm_requests_in_flight_share_one_call_and_its_tokens() {
    let fleet =
        StreamingFleet::alone("key = { json = [\"/model\", \"/messages\", \"/temperature\"] }")
            .await;
    let upstream = &fleet.upstream;
    let target = fleet.url(0, "/recommend/chat");
    let prompt = |spacing: &str| {
        Bytes::from(format!(
            "{{\"model\":\"m\",{spacing}\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"temperature\":0}}"
        ))
    };
    let ask = |body: Bytes| {
        let target = target.clone();
        tokio::spawn(async move { Reader::send(http::Method::POST, &target, body).await })
    };
    let leader = ask(prompt(""));
    let writer = upstream.next_call().await;
    // The same request written differently (whitespace) is the same key.
    let others: Vec<_> = (0..3).map(|_| ask(prompt(" "))).collect();
    writer.event(1).await;
    let mut readers = vec![leader.await.expect("leader")];
    readers.extend(heads(others).await);
    read_everywhere(&mut readers, 1).await;
    for n in 2..=5 {
        writer.event(n).await;
    }
    drop(writer);
    for reader in &mut readers {
        reader.finish().await.expect("clean end");
        assert_eq!(reader.read, events(5));
    }
    assert!(
        readers[1..]
            .iter()
            .all(|r| r.cache_status.contains("collapsed"))
    );
    assert_eq!(
        upstream.calls(),
        1,
        "identical prompts in flight make one call"
    );
    // A different prompt is another key: its own call.
    let other = ask(Bytes::from_static(
        b"{\"model\":\"m\",\"messages\":[],\"temperature\":1}",
    ));
    let writer = upstream.next_call().await;
    drop(writer);
    let mut other = other.await.expect("other prompt");
    other.finish().await.expect("clean end");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_reader_slows_nobody_and_is_cut_once_it_falls_behind_the_window() {
    let fleet = StreamingFleet::alone("max_entry_size = \"64KiB\"").await;
    let path = "/recommend?segment=slow";
    let fast = fleet.reader(0, path);
    let writer = fleet.upstream.next_call().await;
    let slow = fleet.reader(0, path);
    let chunk = Bytes::from(vec![b'y'; 64 * 1024]);
    assert!(writer.bytes(chunk.clone()).await);
    let (mut fast, mut slow) = (fast.await.expect("fast"), slow.await.expect("slow"));
    // 64 MiB: far more than the relay's window and every socket buffer between.
    let chunks = 1024;
    let feed = tokio::spawn(async move {
        for _ in 1..chunks {
            if !writer.bytes(chunk.clone()).await {
                return false;
            }
        }
        true
    });
    // The slow client reads nothing until the fast one has read everything.
    fast.finish()
        .await
        .expect("the fast reader reads to a clean end");
    assert_eq!(fast.read.len(), chunks * 64 * 1024);
    assert!(
        feed.await.expect("feed"),
        "the fill read the whole upstream body"
    );
    let cut = slow.finish().await;
    assert!(cut.is_err(), "the laggard is cut, visibly: {cut:?}");
    assert!(slow.read.len() < chunks * 64 * 1024);
    let metrics = fleet[0].proxy().render_metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("corral_stream_readers_cut_total") && !l.ends_with(" 0")),
        "the cut is counted:\n{metrics}"
    );
}
