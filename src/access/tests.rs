use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use super::format::{LineText, civil, decimal, padded};
use super::record::Recorded;
use super::*;

/// An output that says when a write starts and blocks until told to go on: a stderr nobody reads.
struct Blocked {
    started: Sender<()>,
    go: Receiver<()>,
    written: Arc<Mutex<Vec<u8>>>,
}

impl Write for Blocked {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.started.send(());
        let _ = self.go.recv();
        if let Ok(mut w) = self.written.lock() {
            w.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static GET: Method = Method::GET;

fn line(path: &str) -> AccessLine<'_> {
    AccessLine::new(&GET, path, "recommend", 200, CacheOutcome::Hit, 12)
}

/// Bytes of `lines` recorded lines like [`line`]'s with a one-digit path.
fn bytes_of(lines: usize) -> usize {
    let mut records = Vec::new();
    super::record::put(&mut records, &line("/1"));
    records.len() * lines
}

#[test]
fn a_full_thread_buffer_drops_and_counts_lines_and_never_blocks_the_sender() {
    let (started, write_started) = channel();
    let (go, wait) = channel();
    let written = Arc::new(Mutex::new(Vec::new()));
    let out = Blocked {
        started,
        go: wait,
        written: written.clone(),
    };
    let dropped = Counter::default();
    let log = AccessLog::start(
        LineFormat::Text,
        Box::new(out),
        bytes_of(2),
        dropped.clone(),
    )
    .expect("the writer thread starts");

    // The writer takes the first line and blocks writing it.
    assert_eq!(log.send(&line("/1")), Sent::Queued);
    write_started.recv().expect("the writer writes");
    // Two more fill this thread's buffer; the next five find it full. None of these calls waits.
    let sent: Vec<Sent> = (2..=8).map(|i| log.send(&line(&format!("/{i}")))).collect();
    assert_eq!(sent[..2], [Sent::Queued, Sent::Queued]);
    assert!(sent[2..].iter().all(|s| *s == Sent::Dropped), "{sent:?}");
    assert_eq!(dropped.get(), 5);

    // Unblocked, the writer writes what was queued, in order, and a flush waits for it.
    for _ in 0..10 {
        let _ = go.send(());
    }
    assert_eq!(log.flush(Duration::from_secs(10)), Flushed::Written);
    let text = String::from_utf8(written.lock().expect("not poisoned").clone()).expect("utf-8");
    let paths: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split(" path=").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    assert_eq!(paths, ["/1", "/2", "/3"]);
}

#[test]
fn a_flush_behind_a_blocked_writer_gives_up_at_its_limit() {
    let (started, write_started) = channel();
    let (go, wait) = channel();
    let out = Blocked {
        started,
        go: wait,
        written: Arc::default(),
    };
    let log = AccessLog::start(
        LineFormat::Text,
        Box::new(out),
        bytes_of(1),
        Counter::default(),
    )
    .expect("the writer thread starts");
    assert_eq!(log.send(&line("/1")), Sent::Queued);
    write_started.recv().expect("the writer writes");
    assert_eq!(log.flush(Duration::from_millis(20)), Flushed::TimedOut);
    let _ = go.send(());
}

#[test]
fn lines_look_like_the_tracing_lines_around_them() {
    let at = Duration::from_micros(1_767_323_045_678_901);
    let mut line = AccessLine::new(&Method::POST, "/a\"b", "-", 404, CacheOutcome::UriMiss, 7);
    line.at = at;
    let mut text = Vec::new();
    LineText::new(LineFormat::Text).line(&mut text, &Recorded::from(&line));
    assert_eq!(
        String::from_utf8_lossy(&text),
        "2026-01-02T03:04:05.678901Z  INFO corral::access: request method=POST path=/a\"b \
         route=- status=404 outcome=\"uri_miss\" micros=7\n"
    );
    let mut json = Vec::new();
    LineText::new(LineFormat::Json).line(&mut json, &Recorded::from(&line));
    let value: serde_json::Value = serde_json::from_slice(&json).expect("one JSON object");
    assert_eq!(
        value,
        serde_json::json!({
            "timestamp": "2026-01-02T03:04:05.678901Z",
            "level": "INFO",
            "fields": {
                "message": "request", "method": "POST", "path": "/a\"b", "route": "-",
                "status": 404, "outcome": "uri_miss", "micros": 7
            },
            "target": "corral::access"
        })
    );
}

#[test]
fn the_constant_parts_of_a_line_name_its_target() {
    let target = ACCESS_LOG.as_bytes();
    for part in [format::TEXT_HEAD, format::JSON_TAIL] {
        assert!(part.windows(target.len()).any(|w| w == target));
    }
}

#[test]
fn civil_dates_cross_leap_years_and_centuries() {
    assert_eq!(civil(0), (1970, 1, 1));
    assert_eq!(civil(11_016), (2000, 2, 29));
    assert_eq!(civil(11_017), (2000, 3, 1));
    assert_eq!(civil(20_454), (2026, 1, 1));
}

#[test]
fn numbers_are_written_whole() {
    let mut buf = Vec::new();
    for n in [0, 7, 10, 404, u64::MAX] {
        decimal(&mut buf, n);
        buf.push(b' ');
    }
    padded(&mut buf, 5, 6);
    assert_eq!(
        String::from_utf8_lossy(&buf),
        "0 7 10 404 18446744073709551615 000005"
    );
    for n in (0..100_000).chain([u64::MAX - 1, u64::MAX]) {
        buf.clear();
        decimal(&mut buf, n);
        assert_eq!(buf, n.to_string().as_bytes(), "{n}");
    }
}

#[test]
fn client_addresses_are_written_as_display_writes_them() {
    // One writer for all: each address after the one before it, the same address again with
    // another port, another address with the same text length, ports of every length.
    let mut writer = LineText::new(LineFormat::Text);
    let listed = [
        "127.0.0.1:40000",
        "0.0.0.0:1",
        "255.255.255.255:65535",
        "255.255.255.255:0",
        "255.255.255.254:9",
        "[::1]:8080",
        "127.0.0.1:10",
        "127.0.0.1:100",
        "127.0.0.1:1000",
        "127.0.0.1:10000",
        "127.0.0.1:65535",
    ];
    let mut addrs: Vec<std::net::SocketAddr> = listed
        .iter()
        .map(|addr| addr.parse().expect("a socket address"))
        .collect();
    addrs.extend(
        (0..=u16::MAX)
            .step_by(7)
            .map(|port| std::net::SocketAddr::from(([10, 1, 2, 3], port))),
    );
    for addr in addrs {
        let mut buf = Vec::new();
        writer.socket_addr(&mut buf, &addr);
        assert_eq!(String::from_utf8_lossy(&buf), addr.to_string());
    }
    // Every octet in every position, beside one of each other length.
    for n in 0..=255u8 {
        for octets in [
            [n, 0, 10, 100],
            [255, n, 9, 99],
            [1, 22, n, 255],
            [200, 2, 20, n],
        ] {
            let addr = std::net::SocketAddr::from((octets, u16::from(n) * 257));
            let mut buf = Vec::new();
            writer.socket_addr(&mut buf, &addr);
            assert_eq!(String::from_utf8_lossy(&buf), addr.to_string());
        }
    }
}

#[test]
fn a_request_id_is_cut_at_its_limit_on_a_character_boundary() {
    let method = Method::GET;
    let long = "x".repeat(REQUEST_ID_MAX + 10);
    let line = AccessLine::new(&method, "/", "r", 200, CacheOutcome::Hit, 1).of_request(
        None,
        ([127, 0, 0, 1], 1).into(),
        Some(&long),
        None,
    );
    assert_eq!(line.request_id.map(str::len), Some(REQUEST_ID_MAX));
    let accented = format!("{}é", "x".repeat(REQUEST_ID_MAX - 1));
    let line = line.of_request(None, ([127, 0, 0, 1], 1).into(), Some(&accented), None);
    assert_eq!(line.request_id.map(str::len), Some(REQUEST_ID_MAX - 1));
}

#[test]
fn timestamps_in_one_second_and_the_next_are_each_right() {
    let base = Duration::from_micros(1_767_323_045_678_901);
    let mut buf = Vec::new();
    let mut writer = LineText::new(LineFormat::Text);
    for at in [
        base,
        base + Duration::from_micros(100),
        base + Duration::from_secs(1),
        base + Duration::from_secs(86_400),
        Duration::from_micros(1_767_323_045_000_042),
    ] {
        writer.timestamp(&mut buf, at);
        buf.push(b' ');
    }
    assert_eq!(
        String::from_utf8_lossy(&buf),
        "2026-01-02T03:04:05.678901Z 2026-01-02T03:04:05.679001Z 2026-01-02T03:04:06.678901Z \
         2026-01-03T03:04:05.678901Z 2026-01-02T03:04:05.000042Z "
    );
}

/// An output that keeps what is written, for the test to read.
#[derive(Clone, Default)]
struct Kept(Arc<Mutex<Vec<u8>>>);

impl Write for Kept {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Kept {
    fn paths(&self) -> Vec<String> {
        let text = String::from_utf8(lock(&self.0).clone()).expect("utf-8");
        text.lines()
            .filter_map(|l| l.split(" path=").nth(1))
            .filter_map(|rest| rest.split(' ').next())
            .map(str::to_owned)
            .collect()
    }
}

#[test]
fn every_threads_lines_are_written_in_its_order_and_an_ended_threads_buffer_is_let_go() {
    let out = Kept::default();
    let log = Arc::new(
        AccessLog::start(
            LineFormat::Text,
            Box::new(out.clone()),
            THREAD_BYTES,
            Counter::default(),
        )
        .expect("the writer thread starts"),
    );
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for n in 0..100 {
                    assert_eq!(log.send(&line(&format!("/{t}/{n}"))), Sent::Queued);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("the thread ends");
    }
    assert_eq!(log.flush(Duration::from_secs(10)), Flushed::Written);
    let paths = out.paths();
    assert_eq!(paths.len(), 400);
    for t in 0..4 {
        let own: Vec<&String> = paths
            .iter()
            .filter(|p| p.starts_with(&format!("/{t}/")))
            .collect();
        let expected: Vec<String> = (0..100).map(|n| format!("/{t}/{n}")).collect();
        assert_eq!(
            own,
            expected.iter().collect::<Vec<_>>(),
            "thread {t}'s lines in order"
        );
    }
    // The four threads ended and their lines are written: the writer lets their buffers go.
    for _ in 0..500 {
        if lock(&log.shared.shards).is_empty() {
            return;
        }
        let _ = log.flush(Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "{} buffers of ended threads are still held",
        lock(&log.shared.shards).len()
    );
}

#[test]
fn a_line_after_a_quiet_spell_wakes_the_writer() {
    let out = Kept::default();
    let log = AccessLog::start(
        LineFormat::Text,
        Box::new(out.clone()),
        THREAD_BYTES,
        Counter::default(),
    )
    .expect("the writer thread starts");
    for round in 0..3 {
        // Quiet: the writer has nothing to write and sleeps until a line comes.
        std::thread::sleep(GATHER * 4);
        let path = format!("/{round}");
        assert_eq!(log.send(&line(&path)), Sent::Queued);
        let mut waited = 0;
        while !out.paths().contains(&path) {
            assert!(waited < 1000, "line {round} was never written");
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
    }
}

#[test]
fn json_strings_read_back_as_written_whatever_they_hold() {
    let cases = [
        "",
        "/recommend",
        "a\"quoted\" \\path\\",
        "tab\there, newline\nthere, nul\0, escape\x1b, unit\x1f, del\x7f",
        "é, ü, 日本, 🦀 and \"\u{2028}\"",
        "\\",
        "\"",
    ];
    for case in cases {
        let mut buf = Vec::new();
        format::json_string(&mut buf, case.as_bytes());
        let back: String = serde_json::from_slice(&buf)
            .unwrap_or_else(|e| panic!("{case:?} wrote {:?}: {e}", String::from_utf8_lossy(&buf)));
        assert_eq!(back, case);
        // Nothing a JSON string needs escaped is left raw.
        let inner = &buf[1..buf.len() - 1];
        assert!(inner.iter().all(|&b| b >= 0x20), "{case:?}");
    }
    let mut buf = Vec::new();
    format::json_string(&mut buf, b"/plain/path?x=1");
    assert_eq!(buf, b"\"/plain/path?x=1\"");
    buf.clear();
    format::json_string(&mut buf, b"\n");
    assert_eq!(buf, b"\"\\u000a\"");
}

#[test]
fn the_escape_check_finds_every_byte_that_needs_one_wherever_it_is() {
    let needs = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    // Every byte value at every place of strings around the check's 8-byte words, in a string
    // of bytes that need nothing and of bytes ≥ 0x80 (the check must not take those for controls).
    for filler in [b'a', 0x20, b'~', 0x7f, 0x80, 0xa2, 0xdc, 0xff] {
        for len in 1..=17 {
            for at in 0..len {
                for byte in 0..=255u8 {
                    let mut bytes = vec![filler; len];
                    bytes[at] = byte;
                    assert_eq!(
                        format::needs_escape(&bytes),
                        needs(byte),
                        "byte {byte:#x} at {at} of {len} among {filler:#x}"
                    );
                }
            }
        }
    }
    assert!(!format::needs_escape(b""));
}

proptest::proptest! {
    #[test]
    fn the_escape_check_agrees_with_a_byte_by_byte_one(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
        let byte_by_byte = bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        proptest::prop_assert_eq!(format::needs_escape(&bytes), byte_by_byte);
    }
}
