//! A property test that hunts for requests billed past their reservation: seeded random chat bodies (nulls,
//! duplicated keys, `n`, caps of odd types, optional fields that change the bill) go through the real
//! gateway to the mock in real-API mode, which reads them as the real providers do (last duplicate wins,
//! null caps uncapped, `n` honoured).
//!
//! For every body: the gateway either refuses it before the provider (nothing reaches the mock), or the
//! provider receives a body that reads strictly (no duplicates, valid JSON) and bills at most what that very
//! body allows (cap x choices), and the gateway's charge never exceeds its reservation. Bounded: 160 bodies
//! per run (about two seconds); `TOLLGATE_PROP_SEED=n` replays another seed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use serde_json::json;
use tollgate_dataplane::providers::request::Body;
use tollgate_dataplane::providers::Api;
use tollgate_tests::*;

/// xorshift64*: enough randomness for generating bodies, and reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A value for a numeric field as careless clients send them.
fn odd_number(r: &mut Rng) -> String {
    match r.below(8) {
        0 => "null".into(),
        1 => format!("\"{}\"", r.below(50)),
        2 => format!("{}.5", r.below(50)),
        3 => "-1".into(),
        _ => (1 + r.below(60)).to_string(),
    }
}

/// One chat completions body: a member list, shuffled, with duplicates and nulls sprinkled in.
fn body(r: &mut Rng) -> String {
    let mut members: Vec<String> = vec![
        r#""model":"gpt-4o-mini""#.into(),
        r#""messages":[{"role":"user","content":"hello there"}]"#.into(),
    ];
    if r.chance(60) {
        members.push(format!("\"max_tokens\":{}", odd_number(r)));
    }
    if r.chance(50) {
        members.push(format!("\"max_completion_tokens\":{}", odd_number(r)));
    }
    if r.chance(50) {
        let n = match r.below(6) {
            0 => "null".to_string(),
            1 => "0".into(),
            _ => (1 + r.below(6)).to_string(),
        };
        members.push(format!("\"n\":{n}"));
    }
    if r.chance(40) {
        members.push(format!(
            "\"stream\":{}",
            ["true", "false", "null"][r.below(3) as usize]
        ));
    }
    if r.chance(30) {
        let v = [
            "null",
            r#"{"include_usage":true}"#,
            r#"{"include_usage":false}"#,
            r#"{}"#,
        ][r.below(4) as usize];
        members.push(format!("\"stream_options\":{v}"));
    }
    if r.chance(15) {
        let v = ["\"flex\"", "\"priority\"", "null", "\"auto\""][r.below(4) as usize];
        members.push(format!("\"service_tier\":{v}"));
    }
    if r.chance(8) {
        members.push(r#""web_search_options":{}"#.into());
    }
    if r.chance(8) {
        members.push(r#""modalities":["text","audio"]"#.into());
    }
    if r.chance(10) {
        members.push(r#""logprobs":true,"top_logprobs":3"#.into());
    }
    // A duplicate of a member already there, with another value, anywhere in the list.
    if r.chance(25) {
        let dup = match r.below(4) {
            0 => format!("\"n\":{}", 1 + r.below(50)),
            1 => format!("\"max_tokens\":{}", odd_number(r)),
            2 => "\"max_completion_tokens\":null".into(),
            _ => "\"stream_options\":null".into(),
        };
        members.push(dup);
    }
    // Shuffle (Fisher-Yates).
    for i in (1..members.len()).rev() {
        let j = r.below(i as u64 + 1) as usize;
        members.swap(i, j);
    }
    format!("{{{}}}", members.join(","))
}

#[test]
fn no_generated_request_is_billed_past_its_reservation_or_differs_from_what_was_priced() {
    let seed: u64 = std::env::var("TOLLGATE_PROP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7011_6A7E);
    let m = mock(&["--expect-key", MOCK_KEY, "--real-api"]);
    // A budget on everyone that every request fits, so each admitted request logs its reservation.
    let extra = r#"
[[budgets]]
name = "all"
amount_usd = "1000"
window = "day"
scope = "everyone"
"#;
    let g = gateway(&config_for(&format!("http://{}", m.addr), "", extra));
    let clear = || {
        request(
            m.addr,
            b"DELETE /_mock/requests HTTP/1.1\r\nHost: m\r\n\r\n",
        )
    };
    let mut rng = Rng(seed | 1);
    let (mut served, mut refused) = (0, 0);
    for i in 0..160 {
        let b = body(&mut rng);
        clear();
        let r = post(
            g.addr,
            "/v1/chat/completions",
            &b,
            "x-mock-output-tokens: 300\r\nx-mock-token-delay-ms: 0\r\n",
        );
        let got = mock_requests(&m);
        let case = format!("seed {seed}, body {i}: {b}");
        if r.status != 200 {
            assert!(
                (400..500).contains(&r.status),
                "{case}: status {} {}",
                r.status,
                r.text()
            );
            assert!(
                got.is_empty(),
                "{case}: refused ({}) but forwarded",
                r.status
            );
            refused += 1;
            continue;
        }
        served += 1;
        assert_eq!(got.len(), 1, "{case}");
        let sent = got[0]["body"].as_str().unwrap();
        // What the provider received reads strictly: nothing it reads differently from the gateway.
        let view = Body::parse(sent.as_bytes())
            .unwrap_or_else(|e| panic!("{case}: the provider received {sent}: {}", e.message));
        let billing = Api::OpenAi
            .view(&view)
            .unwrap_or_else(|e| panic!("{case}: {}", e.message));
        let billed = &got[0]["billed"];
        let (out, choices) = (
            billed["output_tokens"].as_u64().unwrap(),
            billed["choices"].as_u64().unwrap(),
        );
        assert_eq!(choices, billing.choices, "{case}: sent {sent}");
        if let Some(cap) = billing.cap {
            assert!(
                out <= cap * choices,
                "{case}: billed {out} past {cap} x {choices}"
            );
        }
        let line = g.wait_json(&[
            ("event", json!("request")),
            ("request_id", json!(r.header("x-request-id").unwrap())),
        ]);
        let cost = line["cost_pusd"].as_i64().unwrap();
        let reserved = line["reserved_pusd"].as_i64().unwrap();
        // Without any cap the gateway reserves its default output (docs/budgets.md, overshoot bound); the
        // mock here generates less than that default, so every charge must fit.
        assert!(
            cost <= reserved,
            "{case}: charged {cost} pico-USD past the reservation {reserved} (sent {sent})"
        );
        assert_eq!(line["output_tokens"].as_u64(), Some(out), "{case}");
    }
    // The generator exercises both sides.
    assert!(
        served >= 30 && refused >= 30,
        "served {served}, refused {refused}"
    );
}
