//! Hot-path steps of the data plane, each against the naive way of doing the same thing.
//!
//! - `head_parse`: Tollgate's zero-copy request head parse (httparse + offsets into one frozen buffer, framing
//!   and smuggling checks) vs. parsing into an owned `http::HeaderMap` (what a typical proxy builds).
//! - `model_probe`: the strict view the route phase reads every request with (UTF-8, no duplicate key at
//!   any depth, caps, `n`, unboundable fields) beside the borrowed probe it replaced (only `model` and
//!   `stream`, duplicates of other keys unseen) and a full `serde_json::Value` parse of the body.
//! - `sse_framing`: the zero-copy SSE framer over a realistic stream delivered in network-sized pieces vs.
//!   accumulating a `String` and splitting it into owned events.
//! - `stream_cutoff`: what a budget's stream cut-off costs per event: nothing while the stream's bytes stay
//!   under the reserved output tokens, then a parse and two tokenizer passes per event once counting.
//! - `metrics_record`: what `/metrics` adds to every request on its core (`obs::metrics::CoreMetrics::record`
//!   of a streamed, settled request: requests, tokens, cost and five histograms) beside the same request's
//!   access-log line (`serde_json` of a comparable object, a baseline the core already pays) and a bare
//!   shared-atomic counter bump (the floor of any counting).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use tollgate_dataplane::net::http1::{parse_request, Limits};
use tollgate_dataplane::net::sse::SseFramer;
use tollgate_dataplane::providers::request::Body;
use tollgate_dataplane::providers::Api;

const HEAD: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:8080\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nAccept: application/json\r\nContent-Type: application/json\r\nUser-Agent: OpenAI/Python 1.99.1\r\nX-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.99.1\r\nX-Stainless-OS: Linux\r\nX-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\nX-Stainless-Runtime-Version: 3.11.7\r\nAuthorization: Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ1c2VyIn0.c2ln\r\nX-Stainless-Async: false\r\nX-Stainless-Retry-Count: 0\r\nX-Stainless-Read-Timeout: 600\r\nContent-Length: 96\r\n\r\n";

const LIMITS: Limits = Limits {
    max_head_bytes: 16 * 1024,
    max_headers: 100,
    max_body_bytes: 1 << 25,
};

fn head_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("head_parse");
    g.throughput(Throughput::Bytes(HEAD.len() as u64));
    g.bench_function("tollgate_zero_copy", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(HEAD);
            black_box(parse_request(&mut buf, &LIMITS).unwrap().unwrap());
        })
    });
    g.bench_function("baseline_owned_headermap", |b| {
        b.iter(|| {
            let buf = BytesMut::from(HEAD);
            let mut headers = [httparse::EMPTY_HEADER; 100];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(&buf).unwrap();
            let mut map = http::HeaderMap::with_capacity(req.headers.len());
            for h in req.headers.iter() {
                map.append(
                    http::HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                    http::HeaderValue::from_bytes(h.value).unwrap(),
                );
            }
            black_box((
                req.method.map(str::to_owned),
                req.path.map(str::to_owned),
                map,
            ));
        })
    });
    g.finish();
}

fn chat_body(prompt_words: usize) -> Bytes {
    let prompt: String = (0..prompt_words).map(|i| format!("word{i} ")).collect();
    Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"{prompt}"}}],"temperature":0.2,"stream":true,"max_tokens":256}}"#
    ))
}

fn model_probe(c: &mut Criterion) {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        model: std::borrow::Cow<'a, str>,
        #[serde(default)]
        stream: Option<bool>,
    }
    let mut g = c.benchmark_group("model_probe");
    // A short prompt, a long one, and a long conversation (many small objects: the duplicate-key check's
    // worst case per byte).
    let conversation = {
        let turns: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    r#"{{"role":"{}","content":"turn {i} with a few words of text"}}"#,
                    if i % 2 == 0 { "user" } else { "assistant" }
                )
            })
            .collect();
        Bytes::from(format!(
            r#"{{"model":"gpt-4o-mini","messages":[{}],"stream":true,"max_tokens":256}}"#,
            turns.join(",")
        ))
    };
    for body in [chat_body(20), chat_body(2000), conversation] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("tollgate_borrowed_probe/{}B", body.len()), |b| {
            b.iter(|| {
                let p: Probe<'_> = serde_json::from_slice(black_box(&body)).unwrap();
                black_box((p.model.len(), p.stream));
            })
        });
        // What the route phase does now: the strict read (UTF-8, duplicate keys at every depth, kept
        // members with their spans) and the API's view of caps, choices and unboundable fields.
        g.bench_function(format!("tollgate_strict_view/{}B", body.len()), |b| {
            b.iter(|| {
                let view = Body::parse(black_box(&body)).unwrap();
                let billing = Api::OpenAi.view(&view).unwrap();
                black_box((view.string("model").unwrap().map(|m| m.len()), billing));
            })
        });
        g.bench_function(format!("baseline_full_value/{}B", body.len()), |b| {
            b.iter(|| {
                let v: serde_json::Value = serde_json::from_slice(black_box(&body)).unwrap();
                black_box((v["model"].as_str().map(str::len), v["stream"].as_bool()));
            })
        });
    }
    g.finish();
}

fn sse_stream() -> Vec<u8> {
    let mut s = Vec::new();
    for i in 0..200 {
        s.extend_from_slice(
            format!("data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]}}\n\n")
                .as_bytes(),
        );
    }
    s.extend_from_slice(b"data: [DONE]\n\n");
    s
}

fn sse_framing(c: &mut Criterion) {
    let stream = sse_stream();
    let mut g = c.benchmark_group("sse_framing");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    for piece in [usize::MAX, 1500, 64] {
        let pieces: Vec<Bytes> = stream
            .chunks(piece.min(stream.len()))
            .map(Bytes::copy_from_slice)
            .collect();
        let label = if piece == usize::MAX {
            "whole_events".to_owned()
        } else {
            format!("{piece}B_pieces")
        };
        // Whole events: feed one event per piece, as providers flush them.
        let pieces = if piece == usize::MAX {
            let text = Bytes::from(stream.clone());
            let mut out = Vec::new();
            let mut start = 0;
            for (i, w) in text.windows(2).enumerate() {
                if w == b"\n\n" {
                    out.push(text.slice(start..i + 2));
                    start = i + 2;
                }
            }
            out
        } else {
            pieces
        };
        g.bench_function(format!("tollgate_framer/{label}"), |b| {
            b.iter(|| {
                let mut f = SseFramer::new();
                let mut n = 0usize;
                for p in &pieces {
                    if let Some(ev) = f.push(p.clone()) {
                        n += ev.len();
                    }
                }
                black_box(n)
            })
        });
        g.bench_function(format!("baseline_string_split/{label}"), |b| {
            b.iter(|| {
                let mut acc = String::new();
                let mut events: Vec<String> = Vec::new();
                for p in &pieces {
                    acc.push_str(std::str::from_utf8(p).unwrap_or(""));
                    while let Some(i) = acc.find("\n\n") {
                        events.push(acc[..i + 2].to_owned());
                        acc.drain(..i + 2);
                    }
                }
                black_box(events.len())
            })
        });
    }
    g.finish();
}

/// A realistic OpenAI stream: 200 token deltas, then the usage chunk and [DONE].
fn openai_stream_with_usage() -> Vec<u8> {
    let mut s = sse_stream();
    s.truncate(s.len() - b"data: [DONE]\n\n".len());
    s.extend_from_slice(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":200,\"total_tokens\":1400,\"prompt_tokens_details\":{\"cached_tokens\":1000,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0}}}\n\ndata: [DONE]\n\n");
    s
}

/// The stream's events as providers flush them: one per piece.
fn one_event_per_piece(stream: Vec<u8>) -> Vec<Bytes> {
    let text = Bytes::from(stream);
    let mut events = Vec::new();
    let mut start = 0;
    for (i, w) in text.windows(2).enumerate() {
        if w == b"\n\n" {
            events.push(text.slice(start..i + 2));
            start = i + 2;
        }
    }
    events
}

fn usage_extraction(c: &mut Criterion) {
    use tollgate_core::ProviderKind;
    use tollgate_dataplane::providers::meter::UsageMeter;
    let events = one_event_per_piece(openai_stream_with_usage());
    let mut g = c.benchmark_group("usage_extraction");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("tollgate_frame_and_meter/stream_202_events", |b| {
        b.iter(|| {
            let mut f = SseFramer::new();
            let mut m = UsageMeter::new(ProviderKind::OpenAi);
            for e in &events {
                if let Some(run) = f.push(e.clone()) {
                    m.observe_events(&run);
                }
            }
            black_box(m.usage().unwrap())
        })
    });
    g.bench_function("baseline_serde_json_every_event/stream_202_events", |b| {
        b.iter(|| {
            let mut usage = None;
            for e in &events {
                let data = std::str::from_utf8(e)
                    .unwrap()
                    .trim_end()
                    .trim_start_matches("data: ");
                if data == "[DONE]" {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                if v["usage"].is_object() {
                    usage = Some(v["usage"]["prompt_tokens"].as_u64());
                }
            }
            black_box(usage)
        })
    });
    g.finish();
}

fn stream_cutoff(c: &mut Criterion) {
    use tollgate_dataplane::spend::cutoff::StreamCutoff;
    assert!(tollgate_dataplane::spend::estimate::warm());
    let events = one_event_per_piece(openai_stream_with_usage());
    let mut g = c.benchmark_group("stream_cutoff");
    g.throughput(Throughput::Elements(events.len() as u64));
    for (name, cap) in [
        ("under_the_byte_bound", 1u64 << 40),
        ("counting", 1_000_000),
    ] {
        // Counting starts past `cap` bytes: for "counting", prime it over the bound first.
        let mut primed = StreamCutoff::new(tollgate_dataplane::providers::Api::OpenAi, cap);
        if cap < 1 << 40 {
            primed.admit(Bytes::from(vec![b':'; cap as usize]), &[]);
        }
        g.bench_function(format!("{name}/stream_202_events"), |b| {
            b.iter(|| {
                let mut cut = primed.clone();
                for e in &events {
                    black_box(cut.admit(e.clone(), &[]));
                }
                assert!(!cut.reached());
                black_box(cut.tokens())
            })
        });
    }
    g.finish();
}

fn metrics_record(c: &mut Criterion) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use tollgate_dataplane::obs::metrics::{CoreMetrics, Sample};
    let mut g = c.benchmark_group("metrics_record");
    let core = CoreMetrics::new(Default::default());
    let models = [
        "gpt-4o-mini",
        "gpt-4o",
        "claude-haiku-4-5",
        "claude-sonnet-4-5",
    ];
    let mut i = 0usize;
    g.bench_function("tollgate_core_local", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            core.record(black_box(&Sample {
                api: "openai",
                provider: Some("openai"),
                model: Some(models[i % models.len()]),
                group: Some("eng"),
                outcome: "complete",
                status: 200,
                stream: true,
                total: Duration::from_micros(1_200_000 + i as u64 % 1000),
                added: Some(Duration::from_micros(60)),
                ttfb: Some(Duration::from_millis(180)),
                tokens: Some([600, 16, 400, 0, 5]),
                cost: Some((129_600_000, 129_600_000)),
                budget_asks: 0,
            }));
        })
    });
    g.bench_function("baseline_access_log_line", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(
                serde_json::to_vec(&serde_json::json!({
                    "event": "request", "api": "openai", "provider": "openai",
                    "model": models[i % models.len()], "status": 200, "outcome": "complete",
                    "total_us": 1_200_000 + i % 1000, "upstream_ttfb_us": 180_000,
                    "input_tokens": 600, "output_tokens": 16, "cost_pusd": 129_600_000u64,
                }))
                .unwrap(),
            )
        })
    });
    let shared = AtomicU64::new(0);
    g.bench_function("floor_one_shared_atomic", |b| {
        b.iter(|| black_box(shared.fetch_add(1, Ordering::Relaxed)))
    });
    g.finish();
}

criterion_group!(
    benches,
    metrics_record,
    head_parse,
    model_probe,
    sse_framing,
    usage_extraction,
    stream_cutoff
);
criterion_main!(benches);
