//! Talks raw HTTP/1.1 to the mock, started through the library API.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tollgate_loadtest::{spawn, MockConfig, MockDefaults, MockHandle, TlsFiles};

fn start(defaults: MockDefaults) -> MockHandle {
    spawn(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 2,
        tls: None,
        defaults,
    })
    .unwrap()
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunked: bool,
    /// The body ended properly (content-length reached or the last chunk seen).
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses one response from `raw` (which holds everything read until EOF).
fn parse(raw: &[u8]) -> Resp {
    let end = find(raw, b"\r\n\r\n").expect("no end of headers");
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let rest = &raw[end + 4..];
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
        chunked: false,
        complete: false,
    };
    if resp.header("transfer-encoding") == Some("chunked") {
        resp.chunked = true;
        let mut at = 0;
        while let Some(eol) = find(&rest[at..], b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[at..at + eol]).unwrap(), 16)
                .unwrap();
            at += eol + 2;
            if size == 0 {
                resp.complete = rest[at..].starts_with(b"\r\n");
                break;
            }
            if rest.len() < at + size + 2 {
                resp.body.extend_from_slice(&rest[at..]);
                break;
            }
            resp.body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
    } else {
        // No content-length: a bodiless status such as 204.
        let len: usize = resp
            .header("content-length")
            .map_or(0, |l| l.parse().unwrap());
        resp.complete = rest.len() >= len;
        resp.body = rest[..len.min(rest.len())].to_vec();
    }
    resp
}

fn read_all(stream: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // An abrupt close (reset, or TLS without close_notify) ends the read too.
            Err(_) => break,
        }
    }
    out
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    req
}

fn send_raw(addr: SocketAddr, raw_request: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw_request.as_bytes()).unwrap();
    read_all(&mut s)
}

fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    parse(&send_raw(addr, &request(method, path, headers, body)))
}

fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    call(addr, "POST", path, headers, body)
}

/// Splits an SSE body into (event name, data) pairs.
fn events(body: &str) -> Vec<(Option<String>, String)> {
    assert!(body.ends_with("\n\n"), "unterminated event in {body:?}");
    body.split_terminator("\n\n")
        .map(|ev| {
            let mut name = None;
            let mut data = String::new();
            for line in ev.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = d.to_string();
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (name, data)
        })
        .collect()
}

fn ceil4(n: usize) -> u64 {
    n.div_ceil(4) as u64
}

#[test]
fn openai_non_stream_shape_and_usage() {
    let mock = start(MockDefaults::default());
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi there"}]}"#;
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[
            ("x-mock-cached-tokens", "3"),
            ("x-mock-reasoning-tokens", "2"),
        ],
        body,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["service_tier"], "default");
    assert_eq!(v["system_fingerprint"], "fp_mock");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["refusal"], Value::Null);
    assert_eq!(choice["message"]["annotations"], serde_json::json!([]));
    assert_eq!(
        choice["message"]["content"],
        "Hello from the Tollgate mock provider this is a deterministic stream of words for load tests "
    );
    let p = ceil4(body.len());
    assert_eq!(
        v["usage"],
        serde_json::json!({
            "prompt_tokens": p,
            "completion_tokens": 16,
            "total_tokens": p + 16,
            "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 2, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
            }
        })
    );
    // Header overrides of both counts.
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[
            ("x-mock-input-tokens", "1234"),
            ("x-mock-output-tokens", "3"),
        ],
        body,
    );
    let v = r.json();
    assert_eq!(v["usage"]["prompt_tokens"], 1234);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 1237);
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from the ");
}

#[test]
fn openai_stream_with_include_usage() {
    let mock = start(MockDefaults {
        output_tokens: 4,
        ..MockDefaults::default()
    });
    let body =
        r#"{"model":"m1","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#;
    let r = post(mock.addr(), "/v1/chat/completions", &[], body);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.chunked && r.complete);
    let evs = events(r.text());
    assert_eq!(evs.len(), 1 + 4 + 1 + 1 + 1);
    assert!(evs.iter().all(|(name, _)| name.is_none()));
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = evs[..evs.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    for c in &chunks {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "m1");
        assert_eq!(c["service_tier"], "default");
        assert_eq!(c["system_fingerprint"], "fp_mock");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        serde_json::json!({"role": "assistant", "content": "", "refusal": null})
    );
    let text: String = chunks[1..5]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello from the Tollgate ");
    assert_eq!(chunks[5]["choices"][0]["delta"], serde_json::json!({}));
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
    for c in &chunks[..6] {
        assert_eq!(c["usage"], Value::Null);
        assert!(c.as_object().unwrap().contains_key("usage"));
    }
    let last = &chunks[6];
    assert_eq!(last["choices"], serde_json::json!([]));
    let p = ceil4(body.len());
    assert_eq!(last["usage"]["prompt_tokens"], p);
    assert_eq!(last["usage"]["completion_tokens"], 4);
    assert_eq!(last["usage"]["total_tokens"], p + 4);
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    // Without include_usage: no usage key and no usage chunk.
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[],
        r#"{"model":"m1","messages":[],"stream":true}"#,
    );
    let evs = events(r.text());
    assert_eq!(evs.len(), 1 + 4 + 1 + 1);
    assert!(!r.text().contains("usage"));
}

#[test]
fn anthropic_stream_event_order_and_usage() {
    let mock = start(MockDefaults::default());
    let body = r#"{"model":"claude-x","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(
        mock.addr(),
        "/v1/messages",
        &[
            ("x-mock-output-tokens", "3"),
            ("x-mock-cache-read-tokens", "7"),
            ("x-mock-cache-write-5m-tokens", "5"),
            ("x-mock-cache-write-1h-tokens", "11"),
        ],
        body,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.complete);
    let evs = events(r.text());
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let data: Vec<Value> = evs
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for ((name, _), d) in evs.iter().zip(&data) {
        assert_eq!(d["type"].as_str(), name.as_deref());
    }
    let msg = &data[0]["message"];
    assert!(msg["id"].as_str().unwrap().starts_with("msg_mock_"));
    assert_eq!(msg["model"], "claude-x");
    assert_eq!(msg["content"], serde_json::json!([]));
    assert_eq!(
        msg["usage"],
        serde_json::json!({
            "input_tokens": ceil4(body.len()),
            "cache_creation_input_tokens": 16,
            "cache_read_input_tokens": 7,
            "cache_creation": {"ephemeral_5m_input_tokens": 5, "ephemeral_1h_input_tokens": 11},
            "output_tokens": 1,
            "service_tier": "standard"
        })
    );
    assert_eq!(
        data[1]["content_block"],
        serde_json::json!({"type": "text", "text": ""})
    );
    let text: String = data[3..6]
        .iter()
        .map(|d| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "Hello from the ");
    assert_eq!(
        data[7],
        serde_json::json!({
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": 3}
        })
    );
}

#[test]
fn anthropic_non_stream_shape() {
    let mock = start(MockDefaults::default());
    let body = r#"{"model":"claude-x","max_tokens":1024,"messages":[]}"#;
    let r = post(
        mock.addr(),
        "/v1/messages",
        &[("x-mock-output-tokens", "2")],
        body,
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(
        v["content"],
        serde_json::json!([{"type": "text", "text": "Hello from "}])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    assert_eq!(v["usage"]["input_tokens"], ceil4(body.len()));
    assert_eq!(v["usage"]["output_tokens"], 2);
    assert_eq!(v["usage"]["cache_creation_input_tokens"], 0);
}

#[test]
fn max_tokens_caps_output() {
    let mock = start(MockDefaults::default());
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","messages":[],"max_tokens":3}"#,
    );
    let v = r.json();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from the ");
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","messages":[],"max_completion_tokens":5}"#,
    );
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
    // Not capped when max_tokens is not below the output.
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","messages":[],"max_tokens":16}"#,
    );
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
    let r = post(
        mock.addr(),
        "/v1/messages",
        &[],
        r#"{"model":"c","max_tokens":2,"messages":[]}"#,
    );
    let v = r.json();
    assert_eq!(v["usage"]["output_tokens"], 2);
    assert_eq!(v["stop_reason"], "max_tokens");
    let r = post(
        mock.addr(),
        "/v1/messages",
        &[],
        r#"{"model":"c","max_tokens":2,"stream":true,"messages":[]}"#,
    );
    let evs = events(r.text());
    let delta: Value = serde_json::from_str(&evs[evs.len() - 2].1).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 2);
}

#[test]
fn injected_status_uses_provider_error_shapes() {
    let mock = start(MockDefaults::default());
    let body = r#"{"model":"m","messages":[]}"#;
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[("x-mock-status", "429")],
        body,
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    let v = r.json();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["param"], Value::Null);
    assert_eq!(v["error"]["code"], Value::Null);
    assert!(v["error"]["message"].is_string());

    let r = post(
        mock.addr(),
        "/v1/messages",
        &[("x-mock-status", "429")],
        body,
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");

    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[("x-mock-status", "503")],
        body,
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), None);
    assert_eq!(r.json()["error"]["type"], "server_error");
    let r = post(
        mock.addr(),
        "/v1/messages",
        &[("x-mock-status", "529")],
        body,
    );
    assert_eq!(r.status, 529);
    assert_eq!(r.json()["error"]["type"], "overloaded_error");
    let r = post(
        mock.addr(),
        "/v1/messages",
        &[("x-mock-status", "500")],
        body,
    );
    assert_eq!(r.json()["error"]["type"], "api_error");
}

#[test]
fn bad_json_and_unknown_paths() {
    let mock = start(MockDefaults::default());
    let r = post(mock.addr(), "/v1/chat/completions", &[], r#"{"model":"#);
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], Value::Null);
    let r = post(mock.addr(), "/v1/messages", &[], "not json");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = post(mock.addr(), "/v2/nothing", &[], "{}");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = call(mock.addr(), "GET", "/healthz", &[], "");
    assert_eq!((r.status, r.text()), (200, "ok"));
    let r = call(mock.addr(), "GET", "/v1/models", &[], "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "list");
    assert!(!r.json()["data"].as_array().unwrap().is_empty());
}

#[test]
fn disconnect_after_leaves_the_response_incomplete() {
    let mock = start(MockDefaults::default());
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[("x-mock-disconnect-after", "2")],
        r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
    );
    assert_eq!(r.status, 200);
    assert!(r.chunked);
    assert!(!r.complete, "the terminating chunk must be missing");
    let evs = events(r.text());
    assert_eq!(evs.len(), 3, "role chunk and two tokens: {evs:?}");
    assert!(!r.text().contains("[DONE]"));
    assert!(!r.text().contains("finish_reason\":\"stop"));

    let r = post(
        mock.addr(),
        "/v1/messages",
        &[("x-mock-disconnect-after", "1")],
        r#"{"model":"c","max_tokens":9,"stream":true,"messages":[]}"#,
    );
    assert!(!r.complete);
    assert!(!r.text().contains("message_stop"));
    assert_eq!(r.text().matches("event: content_block_delta").count(), 1);

    // Non-streamed: headers and half a JSON body, then the abort.
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[("x-mock-disconnect-after", "0")],
        r#"{"model":"m","messages":[]}"#,
    );
    assert_eq!(r.status, 200);
    assert!(!r.complete);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());
}

#[test]
fn malformed_sse_and_omitted_usage() {
    let mock = start(MockDefaults {
        output_tokens: 4,
        ..MockDefaults::default()
    });
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[("x-mock-malformed-sse", "1"), ("x-mock-omit-usage", "1")],
        r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
    );
    assert!(r.complete);
    let evs = events(r.text());
    // role, 2 tokens, garbage, 2 tokens, finish, [DONE]; no usage chunk.
    assert_eq!(evs.len(), 8);
    assert_eq!(evs[3].1, "{\"id\":");
    assert!(serde_json::from_str::<Value>(&evs[3].1).is_err());
    assert_eq!(evs[7].1, "[DONE]");
    assert!(!r.text().contains("usage"));

    let r = post(
        mock.addr(),
        "/v1/messages",
        &[("x-mock-omit-usage", "1")],
        r#"{"model":"c","max_tokens":9,"stream":true,"messages":[]}"#,
    );
    let evs = events(r.text());
    let delta: Value = serde_json::from_str(&evs[evs.len() - 2].1).unwrap();
    assert_eq!(delta["type"], "message_delta");
    assert!(delta.get("usage").is_none());
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[("x-mock-omit-usage", "1")],
        r#"{"model":"m","messages":[]}"#,
    );
    assert!(r.json().get("usage").is_none());
}

#[test]
fn auth_is_enforced_without_echoing_the_key() {
    let mock = start(MockDefaults {
        expected_key: Some("sk-right".into()),
        ..MockDefaults::default()
    });
    let body = r#"{"model":"m","messages":[],"max_tokens":5}"#;
    let r = post(mock.addr(), "/v1/chat/completions", &[], body);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-wrong-123")],
        body,
    );
    assert_eq!(r.status, 401);
    assert!(!r.text().contains("sk-wrong-123"));
    // The Anthropic header does not authenticate OpenAI paths, and vice versa.
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[("x-api-key", "sk-right")],
        body,
    );
    assert_eq!(r.status, 401);
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-right")],
        body,
    );
    assert_eq!(r.status, 200);

    let r = post(
        mock.addr(),
        "/v1/messages",
        &[("x-api-key", "sk-nope-456")],
        body,
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert!(!r.text().contains("sk-nope-456"));
    let r = post(
        mock.addr(),
        "/v1/messages",
        &[("authorization", "Bearer sk-right")],
        body,
    );
    assert_eq!(r.status, 401);
    let r = post(
        mock.addr(),
        "/v1/messages",
        &[("x-api-key", "sk-right")],
        body,
    );
    assert_eq!(r.status, 200);
}

#[test]
fn records_requests_and_keeps_connections_alive() {
    let mock = start(MockDefaults::default());
    let body = r#"{"model":"m","messages":[]}"#;
    // Two requests on one connection; the first keeps it alive.
    let first = request(
        "POST",
        "/v1/chat/completions?x=1",
        &[("x-test", "one")],
        body,
    )
    .replace("connection: close\r\n", "");
    let second = request("POST", "/v1/messages", &[("x-api-key", "k")], body);
    let raw = send_raw(mock.addr(), &format!("{first}{second}"));
    let text = String::from_utf8(raw).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2);

    let r = call(mock.addr(), "GET", "/_mock/requests", &[], "");
    let recs = r.json();
    let recs = recs.as_array().unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["method"], "POST");
    assert_eq!(recs[0]["path"], "/v1/chat/completions");
    assert_eq!(recs[0]["query"], "x=1");
    assert_eq!(recs[0]["body"], body);
    assert!(recs[0]["headers"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(["x-test", "one"])));
    assert_eq!(recs[1]["path"], "/v1/messages");
    assert_eq!(mock.recorded().len(), 2);

    let r = call(mock.addr(), "DELETE", "/_mock/requests", &[], "");
    assert_eq!(r.status, 204);
    let r = call(mock.addr(), "GET", "/_mock/requests", &[], "");
    assert_eq!(r.json(), serde_json::json!([]));

    mock.set_recording(false);
    post(mock.addr(), "/v1/chat/completions", &[], body);
    assert!(mock.recorded().is_empty());
    mock.set_recording(true);
    for _ in 0..70 {
        post(mock.addr(), "/v1/chat/completions", &[], body);
    }
    assert_eq!(mock.recorded().len(), 64);
}

/// Opens a keep-alive connection and completes one request on it.
fn idle_connection(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: mock\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"));
    assert!(buf[..n].ends_with(b"\r\n\r\nok"));
    s
}

/// The server closed the connection (EOF or reset, not a timeout).
fn assert_closed(mut s: TcpStream) {
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("unexpected {n} bytes"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "still open: {e}"
        ),
    }
}

#[test]
fn shutdown_stops_the_server() {
    let mock = start(MockDefaults::default());
    let addr = mock.addr();
    assert_ne!(addr.port(), 0);
    let idle = idle_connection(addr);
    mock.shutdown();
    assert_closed(idle);
}

#[test]
fn serves_tls() {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "tollgate-mock-tls-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cert_pem = dir.join("cert.pem");
    let key_pem = dir.join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    let mock = spawn(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 1,
        tls: Some(TlsFiles { cert_pem, key_pem }),
        defaults: MockDefaults::default(),
    })
    .unwrap();
    assert!(mock.is_tls());

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(mock.addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let body = r#"{"model":"secure","messages":[]}"#;
    tls.write_all(request("POST", "/v1/chat/completions", &[], body).as_bytes())
        .unwrap();
    let r = parse(&read_all(&mut tls));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["model"], "secure");
    assert_eq!(v["usage"]["prompt_tokens"], ceil4(body.len()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn binary_prints_listening_line_and_exits_on_sigterm() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate-mock"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--output-tokens",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert!(line.starts_with(r#"{"event":"listening","addr":"127.0.0.1:"#));
    assert_eq!(v["tls"], false);
    let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
    let r = post(
        addr,
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","messages":[]}"#,
    );
    assert_eq!(r.json()["usage"]["completion_tokens"], 2);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn spawn_and_drop_inside_a_runtime() {
    let mock = start(MockDefaults::default());
    let addr = mock.addr();
    let idle = tokio::task::spawn_blocking(move || idle_connection(addr))
        .await
        .unwrap();
    drop(mock);
    assert_closed(idle);
}

// ------------------------------------------------------------- real-API mode

const REAL: (&str, &str) = ("x-mock-real-api", "1");

/// The data of an OpenAI stream's chunks (without `[DONE]`), checking the terminator.
fn chunks(r: &Resp) -> Vec<Value> {
    let evs = events(r.text());
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    evs[..evs.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect()
}

#[test]
fn real_api_duplicate_keys_last_one_wins() {
    let mock = start(MockDefaults::default());
    let openai = post(
        mock.addr(),
        "/v1/chat/completions",
        &[REAL],
        r#"{"model":"first","messages":[],"n":1,"max_tokens":2,"model":"m","n":3,"max_tokens":5}"#,
    );
    assert_eq!(openai.status, 200, "{}", openai.text());
    let v = openai.json();
    assert_eq!(v["model"], "m");
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    assert_eq!(v["usage"]["completion_tokens"], 15);
    assert_eq!(v["choices"][2]["finish_reason"], "length");
    // A later null lifts an earlier cap.
    let v = post(
        mock.addr(),
        "/v1/chat/completions",
        &[REAL],
        r#"{"model":"m","messages":[],"max_completion_tokens":2,"max_completion_tokens":null}"#,
    )
    .json();
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Anthropic: the last max_tokens caps, whether it lowers or raises the first.
    for (body, out) in [
        (
            r#"{"model":"c","max_tokens":9,"messages":[],"max_tokens":3}"#,
            3,
        ),
        (
            r#"{"model":"c","max_tokens":3,"messages":[],"max_tokens":9}"#,
            9,
        ),
    ] {
        let r = post(mock.addr(), "/v1/messages", &[REAL], body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["usage"]["output_tokens"], out);
    }
    // The default mode still refuses a duplicate key it reads.
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","messages":[],"max_tokens":2,"max_tokens":5}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}

#[test]
fn real_api_n_choices_non_streamed() {
    let mock = start(MockDefaults {
        real_api: true,
        ..MockDefaults::default()
    });
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":3,"max_tokens":4}"#;
    let r = post(mock.addr(), "/v1/chat/completions", &[], body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], "Hello from the Tollgate ");
        assert_eq!(c["finish_reason"], "length");
    }
    let p = ceil4(body.len());
    assert_eq!(v["usage"]["prompt_tokens"], p);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"], p + 12);

    // Uncapped: each choice generates the configured length.
    let v = post(
        mock.addr(),
        "/v1/chat/completions",
        &[("x-mock-output-tokens", "7")],
        r#"{"model":"m","messages":[],"n":3}"#,
    )
    .json();
    assert_eq!(v["usage"]["completion_tokens"], 21);

    // Bad n is refused as the real API does.
    for n in ["0", "-1", "\"3\"", "1.5", "129"] {
        let r = post(
            mock.addr(),
            "/v1/chat/completions",
            &[],
            &format!(r#"{{"model":"m","messages":[],"n":{n}}}"#),
        );
        assert_eq!(r.status, 400, "n = {n}");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
}

#[test]
fn real_api_n_choices_streamed() {
    let mock = start(MockDefaults {
        output_tokens: 4,
        ..MockDefaults::default()
    });
    let body = r#"{"model":"m","messages":[],"stream":true,"n":3,"max_completion_tokens":2,"stream_options":{"include_usage":true}}"#;
    let r = post(mock.addr(), "/v1/chat/completions", &[REAL], body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete);
    let chunks = chunks(&r);
    // 3 role chunks, 2 tokens x 3 choices, 3 finish chunks, 1 usage chunk.
    assert_eq!(chunks.len(), 3 + 6 + 3 + 1);
    let mut text = [String::new(), String::new(), String::new()];
    let mut finished = [None, None, None];
    for c in &chunks[..12] {
        assert_eq!(c["usage"], Value::Null);
        let choices = c["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1);
        let i = choices[0]["index"].as_u64().unwrap() as usize;
        if let Some(t) = choices[0]["delta"]["content"].as_str() {
            text[i].push_str(t);
        }
        if let Some(f) = choices[0]["finish_reason"].as_str() {
            finished[i] = Some(f.to_string());
        }
    }
    assert_eq!(text, ["Hello from ", "Hello from ", "Hello from "]);
    assert_eq!(
        finished,
        [
            Some("length".to_string()),
            Some("length".to_string()),
            Some("length".to_string())
        ]
    );
    let last = &chunks[12];
    assert_eq!(last["choices"], serde_json::json!([]));
    let p = ceil4(body.len());
    assert_eq!(last["usage"]["prompt_tokens"], p);
    assert_eq!(last["usage"]["completion_tokens"], 6);
    assert_eq!(last["usage"]["total_tokens"], p + 6);
}

#[test]
fn real_api_null_caps_are_uncapped() {
    let mock = start(MockDefaults::default());
    let hdrs = [REAL, ("x-mock-output-tokens", "9")];
    for body in [
        r#"{"model":"m","messages":[],"max_tokens":null}"#,
        r#"{"model":"m","messages":[],"max_completion_tokens":null}"#,
        r#"{"model":"m","messages":[],"max_tokens":null,"max_completion_tokens":null}"#,
        r#"{"model":"m","messages":[],"max_tokens":100}"#,
    ] {
        let v = post(mock.addr(), "/v1/chat/completions", &hdrs, body).json();
        assert_eq!(v["usage"]["completion_tokens"], 9, "{body}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{body}");
    }
    // A null max_completion_tokens leaves max_tokens in force.
    let v = post(
        mock.addr(),
        "/v1/chat/completions",
        &hdrs,
        r#"{"model":"m","messages":[],"max_completion_tokens":null,"max_tokens":4}"#,
    )
    .json();
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Streamed, uncapped.
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &hdrs,
        r#"{"model":"m","messages":[],"stream":true,"max_tokens":null,"stream_options":{"include_usage":true}}"#,
    );
    let chunks = chunks(&r);
    assert_eq!(chunks.len(), 1 + 9 + 1 + 1);
    assert_eq!(chunks[11]["usage"]["completion_tokens"], 9);
}

#[test]
fn real_api_stream_options_null_streams_no_usage() {
    let mock = start(MockDefaults {
        output_tokens: 3,
        real_api: true,
        ..MockDefaults::default()
    });
    for body in [
        r#"{"model":"m","messages":[],"stream":true,"stream_options":null}"#,
        r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":null}}"#,
        r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":false}}"#,
        r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true},"stream_options":null}"#,
        r#"{"model":"m","messages":[],"stream":true}"#,
    ] {
        let r = post(mock.addr(), "/v1/chat/completions", &[], body);
        assert_eq!(r.status, 200, "{body}: {}", r.text());
        let chunks = chunks(&r);
        assert_eq!(chunks.len(), 1 + 3 + 1, "{body}");
        assert!(!r.text().contains("usage"), "{body}");
    }
    // The bill is recorded all the same.
    let rec = mock.recorded().pop().unwrap();
    assert_eq!(rec.billed.unwrap().output_tokens, 3);
}

#[test]
fn real_api_anthropic_requires_max_tokens() {
    let mock = start(MockDefaults::default());
    for body in [
        r#"{"model":"c","messages":[],"max_tokens":null}"#,
        r#"{"model":"c","messages":[]}"#,
        r#"{"model":"c","messages":[],"max_tokens":5,"max_tokens":null}"#,
        r#"{"model":"c","messages":[],"stream":true,"max_tokens":null}"#,
    ] {
        let r = post(mock.addr(), "/v1/messages", &[REAL], body);
        assert_eq!(r.status, 400, "{body}");
        let v = r.json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_tokens"),
            "{v}"
        );
    }
    assert!(mock.recorded().iter().all(|r| r.billed.is_none()));
    // Streamed, capped.
    let r = post(
        mock.addr(),
        "/v1/messages",
        &[REAL],
        r#"{"model":"c","messages":[],"stream":true,"max_tokens":2}"#,
    );
    let evs = events(r.text());
    let delta: Value = serde_json::from_str(&evs[evs.len() - 2].1).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 2);
    // The default mode answers without max_tokens, uncapped.
    let r = post(
        mock.addr(),
        "/v1/messages",
        &[],
        r#"{"model":"c","messages":[],"max_tokens":null}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["output_tokens"], 16);
}

#[test]
fn default_mode_is_unchanged() {
    let mock = start(MockDefaults::default());
    // n is ignored: one choice, one choice's usage, no bill recorded.
    let body = r#"{"model":"m","messages":[],"n":3,"max_tokens":4}"#;
    let v = post(mock.addr(), "/v1/chat/completions", &[], body).json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let r = post(
        mock.addr(),
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","messages":[],"stream":true,"n":2}"#,
    );
    assert_eq!(chunks(&r).len(), 1 + 16 + 1);
    assert!(mock.recorded().iter().all(|r| r.billed.is_none()));
    let recs = call(mock.addr(), "GET", "/_mock/requests", &[], "").json();
    assert!(recs[0].get("billed").is_none());
    // A mock-wide real-API mode is turned off per request by x-mock-real-api: 0.
    let real = start(MockDefaults {
        real_api: true,
        ..MockDefaults::default()
    });
    let v = post(
        real.addr(),
        "/v1/chat/completions",
        &[("x-mock-real-api", "0")],
        body,
    )
    .json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert!(real.recorded()[0].billed.is_none());
}

#[test]
fn real_api_records_the_exact_body_and_the_bill() {
    let mock = start(MockDefaults::default());
    // Whitespace, key order, duplicates and escapes as sent, not re-serialised.
    let body = "{ \"model\":\"m\",\n \"n\" : 1, \"messages\":[{\"role\":\"user\",\"content\":\"caf\\u00e9 \u{1F600}\"}], \"n\":2 ,\"max_tokens\":3}";
    let r = post(mock.addr(), "/v1/chat/completions", &[REAL], body);
    assert_eq!(r.status, 200, "{}", r.text());
    let anthropic = r#"{"model":"c","messages":[],"max_tokens":5}"#;
    post(
        mock.addr(),
        "/v1/messages",
        &[REAL, ("x-mock-input-tokens", "40")],
        anthropic,
    );
    let recs = mock.recorded();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].body, body);
    assert_eq!(&recs[0].body_bytes[..], body.as_bytes());
    let p = ceil4(body.len());
    assert_eq!(
        recs[0].billed,
        Some(tollgate_loadtest::Billed {
            input_tokens: p,
            output_tokens: 6,
            choices: 2,
        })
    );
    // The bill matches the usage on the wire.
    assert_eq!(r.json()["usage"]["prompt_tokens"], p);
    assert_eq!(r.json()["usage"]["completion_tokens"], 6);
    assert_eq!(
        recs[1].billed,
        Some(tollgate_loadtest::Billed {
            input_tokens: 40,
            output_tokens: 5,
            choices: 1,
        })
    );
    // The same over HTTP.
    let json = call(mock.addr(), "GET", "/_mock/requests", &[], "").json();
    assert_eq!(json[0]["body"], body);
    assert_eq!(
        json[0]["billed"],
        serde_json::json!({"input_tokens": p, "output_tokens": 6, "choices": 2})
    );
    assert_eq!(
        json[1]["billed"],
        serde_json::json!({"input_tokens": 40, "output_tokens": 5, "choices": 1})
    );
}

#[test]
fn binary_real_api_flag() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate-mock"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--output-tokens",
            "2",
            "--real-api",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
    let r = post(
        addr,
        "/v1/chat/completions",
        &[],
        r#"{"model":"m","messages":[],"n":2,"max_tokens":null}"#,
    );
    let usage = r.json()["usage"]["completion_tokens"].clone();
    let recs = call(addr, "GET", "/_mock/requests", &[], "").json();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(child.wait().unwrap().success());
    assert_eq!(usage, 4);
    assert_eq!(recs[0]["billed"]["choices"], 2);
}
