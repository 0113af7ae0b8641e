//! The mock's endpoints that generate no text: OpenAI embeddings (`POST /v1/embeddings`) and Anthropic
//! token counting (`POST /v1/messages/count_tokens`).
//!
//! Both read bodies leniently, as the real APIs do (a duplicate key: the last one wins). Embeddings: `input`
//! is a string, an array of strings, an array of token ids or an array of token-id arrays; each string is
//! `ceil(bytes / 4)` tokens and each token id one token (`x-mock-input-tokens` overrides the total); the
//! answer has one vector per input of `dimensions` numbers (default 1536, 3072 for `*-large`), as floats or,
//! with `encoding_format: "base64"`, as base64 of little-endian `f32`s (what the official SDK asks for by
//! default); `usage` is `prompt_tokens` and `total_tokens`. Token counting: `{"input_tokens": N}` with `N` =
//! `ceil(body bytes / 4)` or `x-mock-input-tokens`; `model` and `messages` are required.
//!
//! Fails: a `400` message naming the field, answered by the caller in the provider's error shape.

use base64::Engine;
use serde_json::{json, Value};

use crate::knobs::Knobs;

/// The largest `dimensions` the mock (like the largest real model) returns.
const MAX_DIMENSIONS: u64 = 3072;

/// An embeddings answer and the input tokens it billed; `Err`: the 400's message.
pub(crate) fn embeddings(body: &[u8], knobs: &Knobs) -> Result<(Vec<u8>, u64), String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .ok_or("you must provide a model parameter")?;
    let inputs: Vec<u64> = match v.get("input") {
        Some(Value::String(s)) => vec![(s.len() as u64).div_ceil(4)],
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_string) {
                items
                    .iter()
                    .map(|s| (s.as_str().map_or(0, str::len) as u64).div_ceil(4))
                    .collect()
            } else if items.iter().all(Value::is_u64) {
                vec![items.len() as u64]
            } else if items.iter().all(|i| {
                i.as_array()
                    .is_some_and(|ids| !ids.is_empty() && ids.iter().all(Value::is_u64))
            }) {
                items
                    .iter()
                    .map(|i| i.as_array().map_or(0, Vec::len) as u64)
                    .collect()
            } else {
                return Err("'$.input' is invalid. Please check the API reference.".into());
            }
        }
        _ => return Err("'$.input' is invalid. Please check the API reference.".into()),
    };
    let default_dims = if model.ends_with("-large") {
        3072
    } else {
        1536
    };
    let dims = match v.get("dimensions") {
        None | Some(Value::Null) => default_dims,
        Some(d) => match d.as_u64() {
            Some(n) if (1..=MAX_DIMENSIONS).contains(&n) => n,
            _ => {
                return Err(format!(
                    "'$.dimensions' must be an integer between 1 and {MAX_DIMENSIONS}"
                ))
            }
        },
    };
    let base64 = match v.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => return Err("'$.encoding_format' must be 'float' or 'base64'".into()),
    };
    let tokens = knobs
        .input_tokens
        .unwrap_or_else(|| inputs.iter().sum::<u64>());
    let data: Vec<Value> = (0..inputs.len())
        .map(|i| {
            let vector: Vec<f32> = (0..dims).map(|j| component(i as u64, j)).collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let mut out = json!({"object": "list", "data": data, "model": model});
    if !knobs.omit_usage {
        out["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    }
    Ok((out.to_string().into_bytes(), tokens))
}

/// Component `j` of input `i`'s vector: deterministic, in [-0.5, 0.5).
fn component(i: u64, j: u64) -> f32 {
    ((i.wrapping_mul(31).wrapping_add(j) % 64) as f32) / 64.0 - 0.5
}

/// A token count answer; `Err`: the 400's message.
pub(crate) fn count_tokens(body: &[u8], knobs: &Knobs) -> Result<Vec<u8>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    if !v.get("model").is_some_and(Value::is_string) {
        return Err("model: Field required".into());
    }
    if !v.get("messages").is_some_and(Value::is_array) {
        return Err("messages: Field required".into());
    }
    let n = knobs
        .input_tokens
        .unwrap_or_else(|| (body.len() as u64).div_ceil(4));
    Ok(json!({ "input_tokens": n }).to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_input_shape_gets_a_vector_each_and_its_tokens() {
        let k = Knobs::default();
        let (body, n) = embeddings(
            br#"{"model":"text-embedding-3-small","input":["abcdefgh","x"],"dimensions":4}"#,
            &k,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(n, 3);
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 4);
        let (_, n) = embeddings(br#"{"model":"m","input":[[1,2],[3]]}"#, &k).unwrap();
        assert_eq!(n, 3);
        let (body, n) = embeddings(
            br#"{"model":"m","input":[5,6,7],"encoding_format":"base64","dimensions":2}"#,
            &k,
        )
        .unwrap();
        assert_eq!(n, 3);
        let v: Value = serde_json::from_slice(&body).unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(v["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        assert_eq!(raw.len(), 8);
        for bad in [
            &br#"{"input":"x"}"#[..],
            br#"{"model":"m"}"#,
            br#"{"model":"m","input":[]}"#,
            br#"{"model":"m","input":["a",1]}"#,
            br#"{"model":"m","input":"a","dimensions":0}"#,
            br#"{"model":"m","input":"a","encoding_format":"int8"}"#,
        ] {
            assert!(embeddings(bad, &k).is_err());
        }
    }

    #[test]
    fn token_counts() {
        let k = Knobs::default();
        let body = br#"{"model":"m","messages":[]}"#;
        let v: Value = serde_json::from_slice(&count_tokens(body, &k).unwrap()).unwrap();
        assert_eq!(v["input_tokens"], (body.len() as u64).div_ceil(4));
        assert!(count_tokens(br#"{"model":"m"}"#, &k).is_err());
    }
}
