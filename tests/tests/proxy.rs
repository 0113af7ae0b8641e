//! The gateway in front of the mock provider: both APIs, streaming and not, routing, headers, upstream faults.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use serde_json::json;
use tollgate_tests::*;

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#;

#[test]
fn openai_non_streaming_round_trip_injects_the_provider_key() {
    // The client's credential (a real service token: identity is checked) never reaches the provider.
    let token = service_token(&test_store(), "proxy");
    let (m, g) = mock_and_gateway("");
    let r = post(
        g.addr,
        "/v1/chat/completions",
        CHAT,
        &format!("Authorization: Bearer {token}\r\nX-Custom: kept\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 16);
    // The mock counts ceil(body bytes / 4) prompt tokens: the gateway forwarded the body unchanged.
    assert_eq!(v["usage"]["prompt_tokens"], CHAT.len().div_ceil(4));
    let id = r
        .header("x-request-id")
        .expect("request id echoed")
        .to_owned();
    assert_eq!(id.len(), 24);

    let seen = mock_requests(&m);
    let last = seen.last().unwrap();
    let headers: Vec<(String, String)> = serde_json::from_value(last["headers"].clone()).unwrap();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        get("authorization"),
        Some(format!("Bearer {MOCK_KEY}").as_str())
    );
    assert_eq!(get("x-request-id"), Some(id.as_str()));
    assert_eq!(get("x-custom"), Some("kept"));
    assert!(
        !last.to_string().contains(&token),
        "client credential forwarded: {last}"
    );
    assert_eq!(last["body"], CHAT);

    let line = g.wait_json(&[("event", json!("request")), ("request_id", json!(id))]);
    assert_eq!(line["status"], 200);
    assert_eq!(line["provider"], "openai");
    assert_eq!(line["route"], "gpt-*");
    assert_eq!(line["model"], "gpt-4o-mini");
    assert_eq!(line["stream"], false);
    assert_eq!(line["outcome"], "complete");
    assert!(line["upstream_ttfb_us"].as_u64().is_some());
    assert!(
        !g.output().contains(MOCK_KEY),
        "provider key leaked into the log"
    );
    assert!(
        !g.output().contains(&token),
        "client token leaked into the log"
    );
}

#[test]
fn openai_stream_carries_every_event_and_the_usage_chunk() {
    let (_m, g) = mock_and_gateway("");
    let body = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(g.addr, "/v1/chat/completions", body, "");
    assert_eq!(r.status, 200);
    assert!(r.complete, "stream not terminated");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    for c in &r.chunks {
        assert!(
            c.ends_with(b"\n\n"),
            "a chunk ends mid-event: {:?}",
            String::from_utf8_lossy(c)
        );
    }
    let events = sse_events(&r.body);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello from the Tollgate mock ");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(usage["prompt_tokens"], body.len().div_ceil(4));
}

#[test]
fn anthropic_stream_and_json_in_their_own_shapes() {
    let token = service_token(&test_store(), "proxy");
    let (m, g) = mock_and_gateway("");
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":3,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(
        g.addr,
        "/v1/messages",
        body,
        &format!("x-api-key: {token}\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete);
    let kinds: Vec<String> = sse_events(&r.body)
        .into_iter()
        .map(|(e, _)| e.unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let seen = mock_requests(&m);
    let headers: Vec<(String, String)> =
        serde_json::from_value(seen.last().unwrap()["headers"].clone()).unwrap();
    assert!(headers.contains(&("x-api-key".into(), MOCK_KEY.into())));
    assert!(
        headers.contains(&("anthropic-version".into(), "2023-06-01".into())),
        "{headers:?}"
    );
    assert!(!headers.iter().any(|(_, v)| v.contains(&token)));

    let json_body = r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(
        g.addr,
        "/v1/messages",
        json_body,
        "anthropic-version: 2023-06-01\r\n",
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["usage"]["output_tokens"], 16);
}

#[test]
fn route_alias_renames_the_model_upstream_only() {
    let (m, g) = mock_and_gateway("");
    let body = r#"{"messages":[{"role":"user","content":"model"}],"model":"fast"}"#;
    let r = post(g.addr, "/v1/chat/completions", body, "");
    assert_eq!(r.status, 200);
    let seen = mock_requests(&m);
    let sent: serde_json::Value =
        serde_json::from_str(seen.last().unwrap()["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["messages"][0]["content"], "model");
    let line = g.wait_json(&[("event", json!("request")), ("model", json!("fast"))]);
    assert_eq!(line["upstream_model"], "gpt-4o-mini");
}

#[test]
fn local_endpoints_and_api_shaped_errors() {
    let (_m, g) = mock_and_gateway("");
    let r = request(g.addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    let r = request(g.addr, b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    let r = request(g.addr, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.json()["data"][0]["id"], "fast");
    let r = request(
        g.addr,
        b"GET /v1/models HTTP/1.1\r\nHost: t\r\nanthropic-version: 2023-06-01\r\n\r\n",
    );
    assert_eq!(r.json()["data"][0]["type"], "model");

    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"nope","messages":[]}"#,
        "",
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"nope","max_tokens":1,"messages":[]}"#,
        "",
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "not_found_error");

    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[}"#,
        "",
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let r = post(g.addr, "/v1/messages", r#"{"messages":[]}"#, "");
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("model"));
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"claude-haiku-4-5","messages":[]}"#,
        "",
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/messages"));
    // Embeddings are an endpoint now (tests/tests/endpoints.rs); a path no API serves is still a 404.
    let r = post(g.addr, "/v1/embeddings", "{}", "");
    assert_eq!(r.status, 400);
    let r = post(g.addr, "/v1/audio/speech", "{}", "");
    assert_eq!(r.status, 404);
    let r = request(
        g.addr,
        b"GET /v1/chat/completions HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert_eq!(r.status, 405);
}

#[test]
fn keep_alive_and_pipelined_requests_share_a_connection() {
    let (_m, g) = mock_and_gateway("");
    let mut c = Conn::open(g.addr);
    for _ in 0..3 {
        c.send(post_bytes("/v1/chat/completions", CHAT, "").as_bytes());
        let r = c.read_response();
        assert_eq!(r.status, 200);
    }
    // Two requests in one write: both answered, in order.
    let two = format!(
        "{}{}",
        post_bytes("/v1/chat/completions", CHAT, ""),
        post_bytes(
            "/v1/chat/completions",
            &CHAT.replace("gpt-4o-mini", "nope"),
            ""
        )
    );
    c.send(two.as_bytes());
    assert_eq!(c.read_response().status, 200);
    assert_eq!(c.read_response().status, 404);
}

#[test]
fn chunked_request_bodies_are_forwarded_with_a_length() {
    let (m, g) = mock_and_gateway("");
    let (a, b) = CHAT.split_at(10);
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let r = request(g.addr, raw.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = mock_requests(&m);
    assert_eq!(seen.last().unwrap()["body"], CHAT);
}

#[test]
fn expect_continue_is_answered() {
    let (_m, g) = mock_and_gateway("");
    let mut c = Conn::open(g.addr);
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            CHAT.len()
        )
        .as_bytes(),
    );
    let mut buf = [0u8; 25];
    c.stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.send(CHAT.as_bytes());
    assert_eq!(c.read_response().status, 200);
}

#[test]
fn upstream_errors_pass_through_in_the_provider_shape() {
    let (_m, g) = mock_and_gateway("");
    let r = post(
        g.addr,
        "/v1/chat/completions",
        CHAT,
        "x-mock-status: 429\r\n",
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(r.header("retry-after"), Some("1"));
}

#[test]
fn unreachable_upstream_is_502_and_slow_upstream_is_504() {
    // A port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let g = gateway(&config_for(&format!("http://{dead}"), "", ""));
    let r = post(g.addr, "/v1/chat/completions", CHAT, "");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_unreachable");
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-haiku-4-5","max_tokens":1,"messages":[]}"#,
        "",
    );
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["type"], "error");

    let m = mock(&["--expect-key", MOCK_KEY]);
    let g = gateway(&config_for(
        &format!("http://{}", m.addr),
        "",
        "[upstream]\nfirst_byte_timeout_ms = 300\n",
    ));
    let r = post(
        g.addr,
        "/v1/chat/completions",
        CHAT,
        "x-mock-first-byte-delay-ms: 3000\r\n",
    );
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
}

#[test]
fn upstream_failure_mid_stream_ends_the_client_stream_cleanly() {
    let (_m, g) = mock_and_gateway("");
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(
        g.addr,
        "/v1/chat/completions",
        body,
        "x-mock-disconnect-after: 3\r\n",
    );
    assert_eq!(r.status, 200);
    assert!(
        r.complete,
        "the client's chunked stream must be terminated properly"
    );
    let events = sse_events(&r.body);
    let last: serde_json::Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(last["error"]["code"], "upstream_protocol_error");
    let line = g.wait_json(&[
        ("event", json!("request")),
        ("outcome", json!("upstream_failed")),
    ]);
    assert_eq!(line["stream"], true);

    let body = r#"{"model":"claude-haiku-4-5","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(
        g.addr,
        "/v1/messages",
        body,
        "x-mock-disconnect-after: 2\r\n",
    );
    assert!(r.complete);
    let (event, data) = sse_events(&r.body).pop().unwrap();
    assert_eq!(event.as_deref(), Some("error"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&data).unwrap()["type"],
        "error"
    );
}

#[test]
fn malformed_sse_from_upstream_is_relayed_without_breaking_the_stream() {
    let (_m, g) = mock_and_gateway("");
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(
        g.addr,
        "/v1/chat/completions",
        body,
        "x-mock-malformed-sse: 1\r\n",
    );
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(sse_events(&r.body).last().unwrap().1, "[DONE]");
}

#[test]
fn client_disconnect_cancels_the_upstream_request() {
    let (_m, g) = mock_and_gateway("");
    // 200 tokens at 50 ms each would take 10 s; the client leaves after the first event.
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut c = Conn::open(g.addr);
    c.send(
        post_bytes(
            "/v1/chat/completions",
            body,
            "x-mock-output-tokens: 200\r\nx-mock-token-delay-ms: 50\r\n",
        )
        .as_bytes(),
    );
    let mut first = [0u8; 64];
    let n = c.stream.read(&mut first).unwrap();
    assert!(n > 0);
    drop(c);
    let line = g.wait_json(&[
        ("event", json!("request")),
        ("outcome", json!("client_gone")),
    ]);
    // Cancelled long before the stream would have ended (bytes_out far below 200 events).
    assert!(line["bytes_out"].as_u64().unwrap() < 20_000, "{line}");
}

/// A one-shot upstream that answers with `events` split into chunks of every size from 1 byte up.
fn splitting_upstream(events: &'static [u8], chunk: usize) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Read the head and the Content-Length body.
        loop {
            let n = s.read(&mut buf).unwrap();
            req.extend_from_slice(&buf[..n]);
            if let Some(p) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&req[..p]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if req.len() >= p + 4 + len {
                    break;
                }
            }
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n").unwrap();
        for piece in events.chunks(chunk) {
            s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .unwrap();
            s.write_all(piece).unwrap();
            s.write_all(b"\r\n").unwrap();
            s.flush().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        s.write_all(b"0\r\n\r\n").unwrap();
    });
    addr
}

#[test]
fn sse_split_anywhere_reaches_the_client_as_whole_events() {
    const STREAM: &[u8] = b"data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\n\r\ndata: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
    for chunk in [1, 2, 3, 7, 50, STREAM.len()] {
        let up = splitting_upstream(STREAM, chunk);
        let g = gateway(&config_for(&format!("http://{up}"), "workers = 1", ""));
        // The client asks for usage itself, so the stream must reach it byte for byte.
        let r = post(
            g.addr,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
            "",
        );
        assert_eq!(r.status, 200);
        assert!(r.complete);
        // Unchanged, then the stream's cost as an SSE comment (gpt-4o: 3 x 2.50 + 2 x 10 USD per 1M tokens).
        let mut want = STREAM.to_vec();
        want.extend_from_slice(b": tollgate-cost=0.0000275\n\n");
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            String::from_utf8_lossy(&want),
            "chunk size {chunk}"
        );
        let line = g.wait_json(&[("event", serde_json::json!("request"))]);
        assert_eq!(line["usage"], "reported", "chunk size {chunk}");
        assert_eq!(line["output_tokens"], 2, "chunk size {chunk}");
        for c in &r.chunks {
            assert!(
                c.ends_with(b"\n\n") || c.ends_with(b"\r\n\r\n"),
                "chunk size {chunk}: client chunk ends mid-event: {:?}",
                String::from_utf8_lossy(c)
            );
        }
    }
}

#[test]
fn usage_the_client_did_not_ask_for_is_removed_at_every_split() {
    const STREAM: &[u8] = b"data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\ndata: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
    const CLIENT_SEES: &[u8] = b"data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: [DONE]\n\n: tollgate-cost=0.0000275\n\n";
    for chunk in [1, 5, 40, STREAM.len()] {
        let up = splitting_upstream(STREAM, chunk);
        let g = gateway(&config_for(&format!("http://{up}"), "workers = 1", ""));
        let r = post(
            g.addr,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
            "",
        );
        assert!(r.complete);
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            String::from_utf8_lossy(CLIENT_SEES),
            "chunk size {chunk}"
        );
        let line = g.wait_json(&[("event", serde_json::json!("request"))]);
        assert_eq!(line["usage"], "reported", "chunk size {chunk}");
    }
}

#[test]
fn epoll_driver_serves_the_same_traffic() {
    let (_m, g) = mock_and_gateway("driver = \"epoll\"");
    g.wait_json(&[("event", json!("listening")), ("driver", json!("epoll"))]);
    let r = post(g.addr, "/v1/chat/completions", CHAT, "");
    assert_eq!(r.status, 200);
    let body = r#"{"model":"claude-haiku-4-5","stream":true,"max_tokens":4,"messages":[]}"#;
    let r = post(g.addr, "/v1/messages", body, "");
    assert!(r.complete);
    assert_eq!(
        sse_events(&r.body).last().unwrap().0.as_deref(),
        Some("message_stop")
    );
}
