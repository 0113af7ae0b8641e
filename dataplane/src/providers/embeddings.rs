//! The OpenAI embeddings API (`POST /v1/embeddings`): everything it means on the wire.
//!
//! Owns: the paths it serves, what an embeddings request makes the provider bill (input tokens only: no
//! output, no choices, no stream), the bound on those input tokens read from `input` before forwarding,
//! usage extraction (`usage.prompt_tokens`), where the input text lives for estimates, and the (empty) end
//! of a stream it never sends. It is served by OpenAI-kind providers, so its credential header, error body,
//! `/v1/models` shape and mid-stream error event are OpenAI's (`providers/mod.rs` dispatches those to
//! [`super::openai`]; this file imports nothing but `json`, `request`, `error` and tollgate-core types).
//!
//! `input` is a string, an array of strings, an array of token ids, or an array of token-id arrays. Token ids
//! are counted exactly (one token each); a string is bounded by its UTF-8 byte length (a BPE token stands for
//! at least one byte), so the reservation is never below what the provider can bill. `dimensions` (a positive
//! integer), `encoding_format` (`float` or `base64`) and `user` do not change what is billed.
//!
//! Fails: 400 `invalid_body` naming the field (`input`, `input[3]`, `dimensions`, `encoding_format`) for a
//! value the API would refuse or read otherwise; never panics on provider bytes (usage that does not parse is
//! a failed parse). Cost: one walk of `input` (it is kept by the strict read), one small `simd-json` parse of
//! the response's usage.

use serde::Deserialize;
use tollgate_core::Usage;

use super::request::{Billing, Body};
use crate::error::{Error, Result};

/// The paths this API is served on; the first is the one named in errors and forwarded upstream.
pub const PATHS: &[&str] = &["/v1/embeddings", "/embeddings"];

/// What an embeddings request makes the provider bill: its input tokens, bounded here from above (token ids
/// exactly, strings by their bytes). No output (the cap is 0 tokens: a policy's `max_tokens` never applies
/// and no cap is written into the body), one "choice", never streamed.
pub fn view(body: &Body<'_>) -> Result<Billing> {
    let Some(input) = body.get("input").filter(|m| !m.is_null()) else {
        return Err(Error::invalid_body(
            "`input` is required: a string, an array of strings, an array of token ids, or an array of token-id arrays",
        ));
    };
    let value: serde_json::Value = serde_json::from_str(input.raw)
        .map_err(|e| Error::invalid_body(format!("`input` is not valid JSON: {e}")))?;
    let input_tokens = input_bound(&value)?;
    if let Some(m) = body.get("dimensions").filter(|m| !m.is_null()) {
        if !m.raw.parse::<u64>().is_ok_and(|d| d >= 1) {
            return Err(Error::invalid_body(format!(
                "`dimensions` must be a positive whole number, not {}",
                truncate(m.raw, 40)
            )));
        }
    }
    if let Some(f) = body.string("encoding_format")? {
        if !matches!(f.as_ref(), "float" | "base64") {
            return Err(Error::invalid_body(format!(
                "`encoding_format` must be \"float\" or \"base64\", not {:?}",
                truncate(&f, 40)
            )));
        }
    }
    Ok(Billing {
        cap: Some(0),
        choices: 1,
        stream: false,
        client_usage: false,
        input_tokens: Some(input_tokens),
        stored_input: false,
    })
}

/// The most input tokens `input` can be billed as; 400 naming the place for a shape the API refuses.
fn input_bound(v: &serde_json::Value) -> Result<u64> {
    use serde_json::Value;
    let shape = "must be a string, an array of strings, an array of token ids, or an array of token-id arrays";
    match v {
        Value::String(s) => Ok(s.len() as u64),
        Value::Array(items) if items.is_empty() => Err(Error::invalid_body(format!(
            "`input` is an empty array: it {shape}, with at least one element"
        ))),
        Value::Array(items) => match &items[0] {
            Value::String(_) => {
                let mut total = 0u64;
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => total = total.saturating_add(s.len() as u64),
                        _ => {
                            return Err(Error::invalid_body(format!(
                            "`input[{i}]` is not a string: an array of strings holds only strings"
                        )))
                        }
                    }
                }
                Ok(total)
            }
            Value::Number(_) => token_ids(items, "input"),
            Value::Array(_) => {
                let mut total = 0u64;
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::Array(ids) if !ids.is_empty() => {
                            total = total.saturating_add(token_ids(ids, &format!("input[{i}]"))?)
                        }
                        Value::Array(_) => {
                            return Err(Error::invalid_body(format!(
                                "`input[{i}]` is an empty token-id array"
                            )))
                        }
                        _ => return Err(Error::invalid_body(format!(
                            "`input[{i}]` is not an array: an array of token-id arrays holds only arrays"
                        ))),
                    }
                }
                Ok(total)
            }
            _ => Err(Error::invalid_body(format!("`input[0]`: `input` {shape}"))),
        },
        _ => Err(Error::invalid_body(format!("`input` {shape}"))),
    }
}

/// An array of token ids: each a non-negative integer, counted as one token.
fn token_ids(ids: &[serde_json::Value], at: &str) -> Result<u64> {
    for (i, id) in ids.iter().enumerate() {
        if id.as_u64().is_none_or(|t| t > u64::from(u32::MAX)) {
            return Err(Error::invalid_body(format!(
                "`{at}[{i}]` must be a token id (a non-negative whole number), not {}",
                truncate(&id.to_string(), 40)
            )));
        }
    }
    Ok(ids.len() as u64)
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[derive(Deserialize)]
struct UsageIn {
    prompt_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Envelope {
    usage: Option<UsageIn>,
}

/// Usage reported in one response: its input tokens (there is no output).
#[derive(Debug, Default)]
pub struct Meter {
    prompt: Option<u64>,
}

impl Meter {
    /// Parses one JSON body (in place). `false` when it is not JSON of the expected shape.
    pub fn observe(&mut self, json: &mut [u8]) -> bool {
        match simd_json::serde::from_slice::<Envelope>(json) {
            Ok(Envelope { usage: Some(u) }) => {
                self.prompt = u.prompt_tokens.or(self.prompt);
                true
            }
            Ok(Envelope { usage: None }) => true,
            Err(_) => false,
        }
    }

    /// The usage, once `prompt_tokens` arrived: input tokens at the input rate, no output.
    pub fn usage(&self) -> Option<Usage> {
        Some(Usage::from_openai(self.prompt?, 0, 0, 0))
    }

    /// Reported input and output so far (an embedding generates no output).
    pub fn partial(&self) -> (Option<u64>, Option<u64>) {
        (self.prompt, Some(0))
    }
}

/// Appends the input text of a request body (its strings, one per line; a token id as one short word, so
/// the estimate counts it as about one token) and returns 0: there are no chat messages to wrap.
pub fn prompt_text(obj: &serde_json::Map<String, serde_json::Value>, out: &mut String) -> u64 {
    fn push(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::String(s) => {
                out.push_str(s);
                out.push('\n');
            }
            serde_json::Value::Number(_) => out.push_str(" a"),
            serde_json::Value::Array(items) => items.iter().for_each(|i| push(i, out)),
            _ => {}
        }
    }
    if let Some(input) = obj.get("input") {
        push(input, out);
    }
    0
}

/// Embeddings generate no text.
pub fn generated_text(_v: &serde_json::Value, _out: &mut String) {}

/// The end of a cut stream: embeddings are never streamed (nor cut), so there is nothing to end.
#[derive(Debug, Clone, Default)]
pub struct StreamEnd;

impl StreamEnd {
    pub fn track(&mut self, _run: &bytes::Bytes) {}

    pub fn tail(&self) -> Vec<u8> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn bound(body: &str) -> Result<u64> {
        let b = Body::parse(body.as_bytes()).unwrap();
        view(&b).map(|v| v.input_tokens.unwrap_or(0))
    }

    #[test]
    fn every_input_shape_is_bounded_from_above() {
        assert_eq!(bound(r#"{"model":"m","input":"héllo"}"#).unwrap(), 6);
        assert_eq!(
            bound(r#"{"model":"m","input":["ab","\u00e9"]}"#).unwrap(),
            4
        );
        assert_eq!(bound(r#"{"model":"m","input":[1,2,3]}"#).unwrap(), 3);
        assert_eq!(
            bound(r#"{"model":"m","input":[[1,2],[3],[4,5,6]]}"#).unwrap(),
            6
        );
        let v = view(&Body::parse(br#"{"model":"m","input":"x","dimensions":8,"encoding_format":"base64","user":"u"}"#).unwrap()).unwrap();
        assert_eq!((v.cap, v.choices, v.stream), (Some(0), 1, false));
    }

    #[test]
    fn bad_input_is_refused_naming_the_place() {
        for (body, place) in [
            (r#"{"model":"m"}"#, "`input` is required"),
            (r#"{"model":"m","input":null}"#, "`input` is required"),
            (r#"{"model":"m","input":5}"#, "`input` must be"),
            (r#"{"model":"m","input":{"a":1}}"#, "`input` must be"),
            (r#"{"model":"m","input":[]}"#, "empty array"),
            (r#"{"model":"m","input":["a",1]}"#, "`input[1]`"),
            (r#"{"model":"m","input":[1,-2]}"#, "`input[1]`"),
            (r#"{"model":"m","input":[1,2.5]}"#, "`input[1]`"),
            (
                r#"{"model":"m","input":[[1],[]]}"#,
                "`input[1]` is an empty",
            ),
            (r#"{"model":"m","input":[[1],["a"]]}"#, "`input[1][0]`"),
            (
                r#"{"model":"m","input":[[1],2]}"#,
                "`input[1]` is not an array",
            ),
            (r#"{"model":"m","input":[true]}"#, "`input[0]`"),
            (
                r#"{"model":"m","input":"a","dimensions":0}"#,
                "`dimensions`",
            ),
            (
                r#"{"model":"m","input":"a","dimensions":"8"}"#,
                "`dimensions`",
            ),
            (
                r#"{"model":"m","input":"a","encoding_format":"int8"}"#,
                "`encoding_format`",
            ),
            (
                r#"{"model":"m","input":"a","encoding_format":3}"#,
                "`encoding_format`",
            ),
        ] {
            let e = bound(body).unwrap_err();
            assert_eq!(e.status(), 400, "{body}");
            assert!(e.message.contains(place), "{body}: {}", e.message);
        }
    }

    #[test]
    fn usage_is_the_prompt_tokens_and_garbage_invents_none() {
        let mut m = Meter::default();
        let mut body = br#"{"object":"list","data":[],"model":"m","usage":{"prompt_tokens":12,"total_tokens":12}}"#.to_vec();
        assert!(m.observe(&mut body));
        let u = m.usage().unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (12, 0));
        let mut m = Meter::default();
        for garbage in [
            &b"{\"usage\":{\"prompt_tokens\":-1}}"[..],
            b"{\"usage\":",
            b"[]",
        ] {
            let mut g = garbage.to_vec();
            m.observe(&mut g);
        }
        assert_eq!(m.usage(), None);
        assert!(StreamEnd.tail().is_empty());
    }
}
