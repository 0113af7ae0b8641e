//! Hostile and broken clients: every bad input gets a clear JSON error or a clean close, never a crash or a
//! hang, and a slow client never stalls anyone else.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::io::{Read, Write};
use std::time::Duration;

use tollgate_tests::*;

fn status_of(g: &Gateway, raw: &[u8]) -> (u16, serde_json::Value) {
    let r = request(g.addr, raw);
    let v = r.json();
    (r.status, v)
}

#[test]
fn limits_and_smuggling_get_json_errors() {
    let (_m, g) = mock_and_gateway("max_body_bytes = 4096\nheader_timeout_ms = 500");
    let big_head = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(17 * 1024)
    );
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(String, u16, &str)> = vec![
        (big_head, 431, "head"),
        (format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{many}\r\n"), 431, "headers"),
        ("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n".into(), 413, "limit"),
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
            400,
            "Content-Length and Transfer-Encoding",
        ),
        ("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".into(), 400, "Content-Length"),
        ("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\n".into(), 400, "chunked"),
        ("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".into(), 400, "chunk"),
        ("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n".into(), 400, "bare LF"),
        ("GARBAGE\r\n\r\n".into(), 400, "malformed"),
        ("GET /healthz HTTP/1.1\r\n\r\n".into(), 400, "Host"),
        ("GET http://other/healthz HTTP/1.1\r\nHost: t\r\n\r\n".into(), 400, "origin-form"),
    ];
    for (raw, want, needle) in cases {
        let (status, v) = status_of(&g, raw.as_bytes());
        assert_eq!(status, want, "{raw:.80?}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    }
    // A chunked body that grows past the limit is refused as it arrives.
    let mut c = Conn::open(g.addr);
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    let chunk = format!("800\r\n{}\r\n", "x".repeat(0x800));
    for _ in 0..3 {
        c.send(chunk.as_bytes());
    }
    assert_eq!(c.read_response().status, 413);
    // The gateway is still healthy after all of that.
    assert_eq!(
        request(g.addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
}

#[test]
fn a_slow_client_times_out_without_stalling_others() {
    let (_m, g) = mock_and_gateway("workers = 1\nheader_timeout_ms = 400\nbody_timeout_ms = 400");
    // Starts a head and stops.
    let mut slow = Conn::open(g.addr);
    slow.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n");
    // Sends a head promising a body and never sends it.
    let mut stuck = Conn::open(g.addr);
    stuck.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{");
    // Meanwhile, on the same single core, normal traffic flows.
    for _ in 0..5 {
        let r = post(
            g.addr,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","messages":[]}"#,
            "",
        );
        assert_eq!(r.status, 200);
    }
    let r = slow.read_response();
    assert_eq!(r.status, 408);
    assert_eq!(r.json()["error"]["code"], "client_timeout");
    assert!(slow.closed());
    let r = stuck.read_response();
    assert_eq!(r.status, 408);
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let (_m, g) = mock_and_gateway("idle_timeout_ms = 300");
    let mut c = Conn::open(g.addr);
    c.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().status, 200);
    assert!(
        c.closed(),
        "idle connection should be closed by the gateway"
    );
}

#[test]
fn random_bytes_never_crash_the_gateway() {
    let (_m, g) = mock_and_gateway("header_timeout_ms = 300\nbody_timeout_ms = 300");
    // A deterministic xorshift stream of garbage, some of it shaped like HTTP.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..40 {
        let mut junk = Vec::new();
        if i % 2 == 0 {
            junk.extend_from_slice(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n");
        }
        for _ in 0..(64 + i * 37) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            junk.push((x & 0xff) as u8);
        }
        let mut c = Conn::open(g.addr);
        let _ = c.stream.write_all(&junk);
        let _ = c.stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut sink = Vec::new();
        let _ = c.stream.read_to_end(&mut sink);
    }
    assert_eq!(
        request(g.addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
}
