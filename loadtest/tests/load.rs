//! Drives the in-process mock with the load generator over real sockets.
//! Counts and kinds are asserted, never wall-clock latencies.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use tollgate_loadtest::load::{run, LoadConfig, Mode, Payload};
use tollgate_loadtest::{spawn, MockConfig, MockHandle};

fn mock() -> MockHandle {
    let handle = spawn(MockConfig::default()).unwrap();
    handle.set_recording(false);
    handle
}

fn closed(addr: SocketAddr, payload: Payload, cap: u64) -> LoadConfig {
    let mut cfg = LoadConfig::new(addr, payload);
    cfg.connections = 4;
    cfg.mode = Mode::Closed;
    cfg.duration = Duration::from_secs(30);
    cfg.max_requests = cap;
    cfg
}

#[test]
fn closed_loop_stops_at_the_request_cap() {
    let mock = mock();
    let report = run(&closed(mock.addr(), Payload::OpenAi, 200)).unwrap();
    assert_eq!(report.requests, 200, "{}", report.table());
    assert_eq!(report.error_count(), 0, "{:?}", report.errors);
    assert_eq!(report.ttlb.len(), 200);
    assert_eq!(report.ttfb.len(), 200);
    assert_eq!(report.events, 0);
    assert!(report.achieved_rate > 0.0);
    assert_eq!(report.intended_rate, None);
}

#[test]
fn anthropic_closed_loop_works() {
    let mock = mock();
    let report = run(&closed(mock.addr(), Payload::Anthropic, 50)).unwrap();
    assert_eq!(report.requests, 50);
    assert_eq!(report.error_count(), 0, "{:?}", report.errors);
}

#[test]
fn open_loop_sends_at_the_rate() {
    let mock = mock();
    let mut cfg = LoadConfig::new(mock.addr(), Payload::OpenAi);
    cfg.connections = 4;
    cfg.mode = Mode::Open { rate: 500.0 };
    cfg.duration = Duration::from_secs(1);
    let report = run(&cfg).unwrap();
    let done = report.requests + report.error_count();
    assert!(
        (400..=600).contains(&done),
        "{done} requests: {}",
        report.table()
    );
    assert_eq!(report.error_count(), 0, "{:?}", report.errors);
    assert_eq!(report.intended_rate, Some(500.0));
    assert!(report.achieved_rate > 0.0);
    assert!(report.send_lag.len() >= report.requests);
}

#[test]
fn open_loop_counts_what_it_could_not_send() {
    let mock = mock();
    let mut cfg = LoadConfig::new(mock.addr(), Payload::OpenAi);
    cfg.connections = 1;
    cfg.mode = Mode::Open { rate: 100.0 };
    cfg.duration = Duration::from_millis(500);
    // Each response takes at least 200 ms: one connection falls behind.
    cfg.headers
        .push(("x-mock-first-byte-delay-ms".into(), "200".into()));
    let report = run(&cfg).unwrap();
    let unsent = report.errors.get("unsent").copied().unwrap_or(0);
    assert!(unsent > 0, "{}", report.table());
    assert_eq!(
        report.requests + report.error_count(),
        50,
        "{}",
        report.table()
    );
}

#[test]
fn warmup_samples_are_discarded() {
    let mock = mock();
    let mut cfg = LoadConfig::new(mock.addr(), Payload::OpenAi);
    cfg.connections = 2;
    cfg.mode = Mode::Open { rate: 200.0 };
    cfg.warmup = Duration::from_millis(500);
    cfg.duration = Duration::from_millis(500);
    let report = run(&cfg).unwrap();
    // 100 intended in the measured half second, 100 more in the warm-up.
    assert!((70..=130).contains(&report.requests), "{}", report.table());
}

#[test]
fn streams_count_events() {
    let mock = mock();
    for payload in [Payload::OpenAiStream, Payload::AnthropicStream] {
        let report = run(&closed(mock.addr(), payload.clone(), 40)).unwrap();
        assert_eq!(report.requests, 40, "{payload:?}: {:?}", report.errors);
        assert!(
            report.events_per_request() >= 17.0,
            "{payload:?}: {} events per request",
            report.events_per_request()
        );
        assert!(report.table().contains("events"));
    }
}

#[test]
fn non_2xx_is_an_error_by_status() {
    let mock = mock();
    let mut cfg = closed(mock.addr(), Payload::OpenAi, 30);
    cfg.headers.push(("x-mock-status".into(), "500".into()));
    let report = run(&cfg).unwrap();
    assert_eq!(report.requests, 0);
    assert_eq!(
        report.errors.get("status_500"),
        Some(&30),
        "{:?}",
        report.errors
    );
    assert!(report.ttlb.is_empty());
}

#[test]
fn nothing_listening_gives_connect_errors_and_returns() {
    // Bind, learn the port, close: nothing listens there any more.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = closed(addr, Payload::OpenAi, 1_000_000);
    cfg.duration = Duration::from_millis(300);
    let report = run(&cfg).unwrap();
    assert_eq!(report.requests, 0);
    assert!(
        report.errors.get("connect").copied().unwrap_or(0) > 0,
        "{:?}",
        report.errors
    );
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);

    // Open loop too.
    cfg.mode = Mode::Open { rate: 100.0 };
    let report = run(&cfg).unwrap();
    assert!(
        report.errors.get("connect").copied().unwrap_or(0) > 0,
        "{:?}",
        report.errors
    );
}

#[test]
fn json_report_has_the_documented_keys() {
    let mock = mock();
    let mut cfg = closed(mock.addr(), Payload::OpenAiStream, 20);
    cfg.intervals = true;
    let report = run(&cfg).unwrap();
    let json = report.to_json();
    for key in [
        "requests",
        "errors",
        "achieved_rate",
        "elapsed_s",
        "events",
        "ttlb_us",
        "ttfb_us",
    ] {
        assert!(json.get(key).is_some(), "missing {key}: {json}");
    }
    for h in ["ttlb_us", "ttfb_us"] {
        for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(json[h][key].is_f64(), "{h}.{key}: {json}");
        }
        assert!(json[h]["p50"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(json["requests"], 20);
    assert!(json["errors"].as_object().unwrap().is_empty());

    // The interval log is V2-encoded and reads back.
    let mut log = Vec::new();
    report.write_interval_log(&mut log).unwrap();
    let mut total = 0;
    for entry in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&log) {
        if let hdrhistogram::serialization::interval_log::LogEntry::Interval(iv) = entry.unwrap() {
            assert_eq!(iv.tag().map(|t| t.as_str()), Some("ttlb"));
            let bytes = base64_decode(iv.encoded_histogram());
            let h: hdrhistogram::Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
                .deserialize(&mut &bytes[..])
                .unwrap();
            total += h.len();
        }
    }
    assert_eq!(total, 20);
}

#[test]
fn bad_configs_are_refused() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut cfg = LoadConfig::new(addr, Payload::OpenAi);
    cfg.connections = 0;
    assert!(run(&cfg).is_err());
    let mut cfg = LoadConfig::new(addr, Payload::OpenAi);
    cfg.mode = Mode::Open { rate: 0.0 };
    assert!(run(&cfg).is_err());
    let mut cfg = LoadConfig::new(addr, Payload::OpenAi);
    cfg.headers.push(("x".into(), "a\r\nb".into()));
    assert!(run(&cfg).is_err());
}

/// Standard base64 without padding checks (test helper; avoids a dependency).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("bad base64 byte {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&b| b != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}
