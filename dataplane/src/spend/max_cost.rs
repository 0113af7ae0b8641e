//! What a request can cost at most, before it is sent: the amount the admit phase reserves.
//!
//! Owns: [`input_token_bound`] (a safe upper bound on the prompt's tokens, from the body's bytes) and
//! [`max_cost`] (that bound and the output cap priced at the request's quote, at the dearest rate any input
//! token could be billed at).
//!
//! Why bytes: every token of a BPE vocabulary stands for at least one byte of text, so a request cannot be
//! billed for more input tokens than its body has bytes (the JSON syntax around the text more than covers the
//! few tokens a chat format adds per message). Tokenizing would be tighter but costs milliseconds on long
//! prompts, is exact only for OpenAI's vocabulary, and misses tool definitions; the bound is one pass of
//! `memchr` over the body. Two kinds of bytes are not text: base64 image data (a megabyte of it is billed
//! as about a thousand tokens) is taken out of the count and each image is counted at [`IMAGE_TOKENS`]
//! instead, the most any current model bills for one image.
//!
//! Fails: never. Cost: a few hundred nanoseconds per kilobyte of body (bench `admission`).

use memchr::memmem;

use crate::providers::json::{key_count, type_count};
use tollgate_core::pricing::Quote;
use tollgate_core::{Money, Usage};

/// The most input tokens one image can be billed as by a current model (OpenAI high detail on the largest
/// tile grids; Anthropic caps an image at about 1,600).
pub const IMAGE_TOKENS: u64 = 2_500;

/// Output tokens reserved for a request that sets no limit when its route sets no default cap either.
pub const DEFAULT_OUTPUT_TOKENS: u64 = 4_096;

/// A safe upper bound on the input tokens `body` can be billed for.
pub fn input_token_bound(body: &[u8]) -> u64 {
    let mut bytes = body.len() as u64;
    // Base64 image data is not text: take it out of the byte count.
    // OpenAI: "url": "data:image/png;base64,...."
    for start in memmem::find_iter(body, b"data:image/") {
        let rest = &body[start..];
        let len = memchr::memchr(b'"', rest).unwrap_or(rest.len()) as u64;
        bytes = bytes.saturating_sub(len);
    }
    // Anthropic: "source": {"type": "base64", "media_type": "image/png", "data": "...."}
    for at in memmem::find_iter(body, b"\"media_type\"") {
        let rest = &body[at..];
        if memmem::find(&rest[..rest.len().min(64)], b"image/").is_none() {
            continue;
        }
        if let Some(d) = memmem::find(&rest[..rest.len().min(256)], b"\"data\"") {
            let after = &rest[d + 6..];
            if let Some(q) = memchr::memchr(b'"', after) {
                let payload = &after[q + 1..];
                let len = memchr::memchr(b'"', payload).unwrap_or(payload.len()) as u64;
                bytes = bytes.saturating_sub(len);
            }
        }
    }
    // Each image part, inline or by URL, at the most an image can be billed: OpenAI parts have one
    // `"image_url"` key, Anthropic parts are `"type": "image"`, Responses parts `"type": "input_image"`
    // (by `file_id`, or with an `"image_url"` too: those are counted twice, which errs toward reserving).
    let images = key_count(body, b"\"image_url\"")
        + type_count(body, b"\"image\"")
        + type_count(body, b"\"input_image\"");
    bytes.saturating_add(images.saturating_mul(IMAGE_TOKENS))
}

/// The most a request with at most `input_tokens` in and `output_tokens` out can cost at the effective
/// (negotiated) price: every input token at the dearest input rate (uncached, or a cache write), and the
/// long-context tier the input size selects.
pub fn max_cost(quote: &Quote, input_tokens: u64, output_tokens: u64) -> Money {
    let as_input = Usage {
        input_tokens,
        output_tokens,
        ..Usage::default()
    };
    let as_write_5m = Usage {
        cache_write_5m_tokens: input_tokens,
        output_tokens,
        ..Usage::default()
    };
    let as_write_1h = Usage {
        cache_write_1h_tokens: input_tokens,
        output_tokens,
        ..Usage::default()
    };
    [as_input, as_write_5m, as_write_1h]
        .iter()
        .map(|u| quote.cost(u).effective)
        .max()
        .unwrap_or(Money::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_covers_the_real_count_of_plain_prompts() {
        let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Summarise the plot of Hamlet in one sentence, please."}]}"#;
        let bound = input_token_bound(body);
        assert_eq!(bound, body.len() as u64);
        // o200k counts this prompt at ~25 tokens (+ chat overhead): the bound is above, never below.
        assert!(bound >= 40);
    }

    #[test]
    fn base64_images_count_as_images_not_bytes() {
        let data = "A".repeat(100_000);
        let openai = format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":[{{"type":"text","text":"what is this"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{data}"}}}}]}}]}}"#
        );
        let b = input_token_bound(openai.as_bytes());
        // The data URL's bytes are gone; one image, at the image cap.
        assert!((IMAGE_TOKENS..IMAGE_TOKENS + 300).contains(&b), "{b}");
        let anthropic = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{data}"}}}}]}}]}}"#
        );
        let b = input_token_bound(anthropic.as_bytes());
        assert!((IMAGE_TOKENS..IMAGE_TOKENS + 300).contains(&b), "{b}");
    }

    #[test]
    fn python_style_spacing_is_recognised() {
        let body = br#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://e.x/a.png"}}, {"type": "image", "source": {"type": "url", "url": "https://e.x/b.png"}}]}]}"#;
        assert_eq!(
            input_token_bound(body),
            body.len() as u64 + 2 * IMAGE_TOKENS
        );
    }

    #[test]
    fn an_image_by_url_is_counted_at_the_image_cap() {
        let body = br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://e.x/a.png"}}]}]}"#;
        assert_eq!(input_token_bound(body), body.len() as u64 + IMAGE_TOKENS);
    }

    #[test]
    fn hostile_bodies_do_not_underflow_or_panic() {
        for b in [
            &b"data:image/"[..],
            b"\"media_type\"",
            b"\"media_type\":\"image/png\",\"data\":\"",
            b"",
        ] {
            let _ = input_token_bound(b);
        }
    }
}
