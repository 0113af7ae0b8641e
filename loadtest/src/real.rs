//! Real-API mode: read request bodies the way the real providers do.
//!
//! The default mode reads a request with a strict serde struct: a duplicate
//! key is a `400`, `n` is ignored and every request yields one choice. That
//! is fine for load tests, but it is not what OpenAI and Anthropic do, and a
//! gateway that reserves money for a request must reserve for what the
//! provider will *bill*, not for what a strict reader would accept. So in
//! real-API mode, turned on for the whole mock by [`MockDefaults::real_api`]
//! (`tollgate-mock --real-api`) or per request by `x-mock-real-api: 1`
//! (`x-mock-real-api: 0` turns it off for one request), the mock behaves like
//! the real APIs on these points:
//!
//! * **Lenient JSON**: the body is read as a [`serde_json::Value`], so of
//!   duplicate keys the **last one wins** (`{"n":1,"n":3}` is `n = 3`,
//!   `{"max_tokens":1,"max_tokens":null}` is uncapped), and unknown keys are
//!   ignored. An integer may be written as a float with no fraction (`3.0`).
//! * **OpenAI `n`** (`/v1/chat/completions`): `n: k` (missing or `null`: 1,
//!   `1..=128`, anything else `400`) produces `k` choices with `index`
//!   `0..k`, each generating `min(cap, D)` tokens (`D` the configured output
//!   length, `x-mock-output-tokens` or [`MockDefaults::output_tokens`]).
//!   `usage.completion_tokens` is the sum over all choices; `prompt_tokens`
//!   is counted once.
//! * **Null caps are no caps**: `max_completion_tokens` wins over
//!   `max_tokens` when it is a number; `null` (or missing) means uncapped, so
//!   the model generates until it stops (here `D` tokens). A number caps each
//!   choice. A negative or non-numeric cap is a `400`.
//! * **`stream_options`**: usage is streamed (one final chunk with
//!   `choices: []` and usage summed over all choices, `"usage":null` on the
//!   chunks before it) only with `stream_options: {"include_usage": true}`;
//!   `null` or a missing `include_usage` means no usage chunk. Each streamed
//!   chunk carries one choice and its `index`: one role chunk per choice,
//!   then per output token one content chunk per choice (sent together, so
//!   `x-mock-token-delay-ms` and the fault knobs count token steps), then one
//!   finish chunk per choice.
//! * **Anthropic `max_tokens`** (`/v1/messages`): required, as by the real
//!   API: missing or `null` is `400 invalid_request_error` naming
//!   `max_tokens`; a number caps the output. There is no `n`.
//!
//! In this mode each request's record ([`RecordedRequest::billed`]) also
//! holds what the mock billed: input tokens, output tokens over all choices,
//! and the number of choices, so an end-to-end test can compare the
//! gateway's charge with the provider's bill. The bill is the full planned
//! usage; the fault knobs (`x-mock-omit-usage`, `x-mock-disconnect-after`,
//! `x-mock-malformed-sse`) change what the client sees, not what is billed.
//!
//! [`MockDefaults::real_api`]: crate::MockDefaults::real_api
//! [`MockDefaults::output_tokens`]: crate::MockDefaults::output_tokens
//! [`RecordedRequest::billed`]: crate::RecordedRequest::billed

use serde_json::{Map, Value};

use crate::wire::ChatRequest;

/// Largest `n` OpenAI accepts.
const MAX_CHOICES: u64 = 128;

/// A non-negative integer, also from a float with no fraction (`3.0`);
/// huge floats saturate.
fn whole_number(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    (f >= 0.0 && f.fract() == 0.0).then_some(f as u64)
}

/// Reads the body as a JSON object with a string `model`.
fn object(body: &[u8]) -> Result<(Map<String, Value>, String), String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
    let Value::Object(map) = value else {
        return Err(
            "We could not parse the JSON body of your request: expected a JSON object.".into(),
        );
    };
    let model = match map.get("model") {
        Some(Value::String(m)) => m.clone(),
        Some(Value::Null) | None => return Err("you must provide a model parameter".into()),
        Some(_) => return Err("model: Input should be a valid string".into()),
    };
    Ok((map, model))
}

/// `stream`: missing or `null` is false.
fn stream(map: &Map<String, Value>) -> Result<bool, String> {
    match map.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err("stream: Input should be a valid boolean".into()),
    }
}

/// A token cap: missing or `null` is no cap.
fn cap(map: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => whole_number(v)
            .map(Some)
            .ok_or_else(|| format!("{key}: Input should be a valid non-negative integer")),
    }
}

/// An OpenAI chat request as the real API reads it.
pub(crate) fn parse_openai(body: &[u8]) -> Result<ChatRequest, String> {
    let (map, model) = object(body)?;
    let stream = stream(&map)?;
    let choices = match map.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => whole_number(v)
            .filter(|n| (1..=MAX_CHOICES).contains(n))
            .ok_or_else(|| format!("n: Input should be an integer from 1 to {MAX_CHOICES}"))?,
    };
    let max_completion_tokens = cap(&map, "max_completion_tokens")?;
    let max_tokens = cap(&map, "max_tokens")?;
    let include_usage = match map.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err("stream_options.include_usage: Input should be a valid boolean".into())
            }
        },
        Some(_) => return Err("stream_options: Input should be a valid object".into()),
    };
    Ok(ChatRequest {
        model,
        stream,
        include_usage,
        max_tokens: max_completion_tokens.or(max_tokens),
        choices,
    })
}

/// An Anthropic messages request as the real API reads it.
pub(crate) fn parse_anthropic(body: &[u8]) -> Result<ChatRequest, String> {
    let (map, model) = object(body)?;
    let stream = stream(&map)?;
    let max_tokens = match map.get("max_tokens") {
        None => return Err("max_tokens: Field required".into()),
        Some(Value::Null) => return Err("max_tokens: Input should be a valid integer".into()),
        Some(v) => whole_number(v)
            .ok_or_else(|| "max_tokens: Input should be a valid non-negative integer".to_owned())?,
    };
    Ok(ChatRequest {
        model,
        stream,
        include_usage: false,
        max_tokens: Some(max_tokens),
        choices: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_duplicate_wins() {
        let r = parse_openai(
            br#"{"model":"a","n":1,"model":"b","n":3,"max_tokens":2,"max_tokens":null}"#,
        )
        .unwrap();
        assert_eq!(r.model, "b");
        assert_eq!(r.choices, 3);
        assert_eq!(r.max_tokens, None);
        let r = parse_anthropic(br#"{"model":"c","max_tokens":null,"max_tokens":4}"#).unwrap();
        assert_eq!(r.max_tokens, Some(4));
    }

    #[test]
    fn caps_and_choices() {
        let r = parse_openai(
            br#"{"model":"m","max_completion_tokens":null,"max_tokens":5,"n":2.0,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            ChatRequest {
                model: "m".into(),
                stream: true,
                include_usage: true,
                max_tokens: Some(5),
                choices: 2,
            }
        );
        let r = parse_openai(br#"{"model":"m","max_completion_tokens":3,"max_tokens":5}"#).unwrap();
        assert_eq!(r.max_tokens, Some(3));
        let r = parse_openai(br#"{"model":"m","n":null,"stream_options":null}"#).unwrap();
        assert_eq!((r.choices, r.include_usage, r.max_tokens), (1, false, None));
        for bad in [
            &br#"{"model":"m","n":0}"#[..],
            br#"{"model":"m","n":129}"#,
            br#"{"model":"m","n":"2"}"#,
            br#"{"model":"m","max_tokens":-1}"#,
            br#"{"model":"m","max_tokens":1.5}"#,
            br#"{"model":"m","stream":"yes"}"#,
            br#"{"model":"m","stream_options":true}"#,
            br#"{"n":1}"#,
            br#"[1]"#,
            br#"{"model":"#,
        ] {
            assert!(
                parse_openai(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn anthropic_requires_max_tokens() {
        let e = parse_anthropic(br#"{"model":"c"}"#).unwrap_err();
        assert!(e.contains("max_tokens"));
        let e = parse_anthropic(br#"{"model":"c","max_tokens":1,"max_tokens":null}"#).unwrap_err();
        assert!(e.contains("max_tokens"));
        let r = parse_anthropic(br#"{"model":"c","max_tokens":9,"n":3,"stream":true}"#).unwrap();
        assert_eq!((r.max_tokens, r.choices, r.stream), (Some(9), 1, true));
    }
}
