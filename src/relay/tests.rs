//! The relay: one writer, many readers, a bounded window past the store limit.

use super::*;
use http_body_util::BodyExt;

async fn read_all(mut reader: RelayReader) -> Result<Vec<u8>, RelayError> {
    let mut out = Vec::new();
    while let Some(frame) = reader.frame().await {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn readers_get_every_chunk_pushed_before_and_after_they_attach() {
    let relay = Relay::new(1024, 16);
    let early = relay.reader().expect("byte 0 is kept");
    relay.push(Bytes::from_static(b"ab")).await;
    let late = relay
        .reader()
        .expect("a body under the store limit is kept whole");
    relay.push(Bytes::from_static(b"cd")).await;
    relay.finish(End::Complete);
    assert_eq!(read_all(early).await.expect("complete"), b"abcd");
    assert_eq!(read_all(late).await.expect("complete"), b"abcd");
    assert_eq!(relay.whole_body().as_deref(), Some(&b"abcd"[..]));
}

#[tokio::test]
async fn an_abort_fails_every_reader_and_leaves_no_whole_body() {
    let relay = Relay::new(1024, 16);
    let reader = relay.reader().expect("byte 0 is kept");
    relay.push(Bytes::from_static(b"partial")).await;
    relay.finish(End::Aborted("upstream reset".into()));
    assert!(matches!(
        read_all(reader).await,
        Err(RelayError::Aborted(_))
    ));
    assert_eq!(relay.whole_body(), None);
    // A later end does not turn an abort into a completion.
    relay.finish(End::Complete);
    assert_eq!(relay.end(), Some(End::Aborted("upstream reset".into())));
}

#[tokio::test]
async fn a_reader_waits_for_the_next_chunk() {
    let relay = Relay::new(1024, 16);
    let mut reader = relay.reader().expect("byte 0 is kept");
    let writer = relay.clone();
    let pushed = tokio::spawn(async move {
        writer.push(Bytes::from_static(b"x")).await;
        writer.finish(End::Complete);
    });
    let frame = reader.frame().await.expect("a frame").expect("data");
    assert_eq!(frame.into_data().ok().as_deref(), Some(&b"x"[..]));
    assert!(reader.frame().await.is_none());
    pushed.await.expect("writer");
}

#[tokio::test]
async fn past_the_store_limit_only_a_window_is_kept_and_a_laggard_is_cut() {
    let relay = Relay::new(4, 4);
    let mut fast = relay.reader().expect("byte 0 is kept");
    let slow = relay.reader().expect("byte 0 is kept");
    for _ in 0..8 {
        relay.push(Bytes::from_static(b"xx")).await;
        // The fast reader keeps up: the writer never waits on the slow one.
        let frame = fast.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().ok().map(|b| b.len()), Some(2));
    }
    relay.finish(End::Complete);
    assert!(fast.frame().await.is_none());
    assert!(relay.oversized());
    assert!(matches!(read_all(slow).await, Err(RelayError::TooSlow)));
    assert_eq!(relay.readers_cut(), 1);
    // Byte 0 is gone: a late joiner cannot read the body.
    assert!(relay.reader().is_none());
    assert_eq!(relay.whole_body(), None);
}

#[tokio::test]
async fn an_oversized_body_nobody_reads_stops_the_writer() {
    let relay = Relay::new(2, 2);
    let reader = relay.reader().expect("byte 0 is kept");
    drop(reader);
    assert_eq!(relay.push(Bytes::from_static(b"xxx")).await, Push::Unread);
}

#[tokio::test(start_paused = true)]
async fn a_relay_waits_a_moment_for_its_first_reader_before_it_counts_as_unread() {
    let relay = Relay::new(2, 2);
    let writer = relay.clone();
    let pushed = tokio::spawn(async move { writer.push(Bytes::from_static(b"xxx")).await });
    tokio::task::yield_now().await;
    // The requester attaches a moment after the fill handed it the relay: nothing was lost.
    let mut reader = relay.reader().expect("byte 0 is kept");
    let frame = reader.frame().await.expect("a frame").expect("data");
    assert_eq!(frame.into_data().ok().as_deref(), Some(&b"xxx"[..]));
    assert_eq!(pushed.await.expect("writer"), Push::Kept);
    // With nobody ever coming, the writer stops after the grace.
    let lonely = Relay::new(2, 2);
    lonely.push(Bytes::from_static(b"xxx")).await;
    tokio::time::advance(ATTACH_GRACE * 2).await;
    assert_eq!(lonely.push(Bytes::from_static(b"yyy")).await, Push::Unread);
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_stopped_reading_ahead_does_not_get_the_active_one_cut() {
    let relay = Relay::new(2, 8);
    let mut stalled = relay.reader().expect("byte 0 is kept");
    let mut active = relay.reader().expect("byte 0 is kept");
    // The stalled reader reads three chunks ahead, then stops; the active one reads one.
    for _ in 0..3 {
        relay.push(Bytes::from_static(b"ab")).await;
        let _ = stalled.frame().await;
    }
    assert!(matches!(active.frame().await, Some(Ok(_))));
    tokio::time::advance(ACTIVE * 2).await;
    // The writer goes on at the active reader's pace; the active reader is never cut.
    for _ in 0..20 {
        let writer = relay.clone();
        let pushed = tokio::spawn(async move { writer.push(Bytes::from_static(b"ab")).await });
        let mut done = false;
        while !done {
            match active.frame().await {
                Some(Ok(_)) => {}
                other => panic!("the active reader must read on: {other:?}"),
            }
            tokio::task::yield_now().await;
            done = pushed.is_finished();
        }
    }
    relay.finish(End::Complete);
    assert!(read_all(active).await.is_ok());
    assert!(matches!(read_all(stalled).await, Err(RelayError::TooSlow)));
}

#[tokio::test(start_paused = true)]
async fn the_writer_waits_for_the_fastest_reader_past_the_window() {
    let relay = Relay::new(2, 2);
    let mut reader = relay.reader().expect("byte 0 is kept");
    assert_eq!(relay.push(Bytes::from_static(b"aa")).await, Push::Kept);
    let writer = relay.clone();
    let third = tokio::spawn(async move { writer.push(Bytes::from_static(b"bb")).await });
    tokio::task::yield_now().await;
    assert!(
        !third.is_finished(),
        "nobody read the window's first chunk yet"
    );
    let _ = reader.frame().await;
    assert_eq!(third.await.expect("writer"), Push::Kept);
}
