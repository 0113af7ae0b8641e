//! Counting tokens for estimates, when a provider's usage never arrived (client abort, upstream failure
//! mid-stream, a provider that omits usage).
//!
//! Owns: the tokenizer (tiktoken's `o200k_base`, whose vocabulary ships inside the binary: no download),
//! built once at start-up by [`warm`] on the main thread (about 100 ms) so no core ever builds it; and the
//! text extraction for the estimate path: the prompt's message and system text from a request body, the
//! generated text from relayed SSE events or a non-streamed body (where an API keeps its text is its own
//! business: [`crate::providers::Api::prompt_text`] and [`crate::providers::Api::generated_text`]). `o200k_base` is OpenAI's current
//! vocabulary; Anthropic publishes no tokenizer, so for Claude models the count is an approximation (stated
//! in the log as `usage: estimated`).
//!
//! Fails: never; if the tokenizer could not be built, or the JSON cannot be read, callers fall back to a
//! bytes/4 estimate. Cost: only on the estimate path (rare): a JSON parse and BPE over the text, bounded by
//! [`MAX_TEXT`] so an abort of a huge stream cannot hold a core for long.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::providers::Api;

static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();

/// Tokens a chat format adds per message, and to prime the reply (OpenAI's published approximation).
pub const MESSAGE_OVERHEAD: u64 = 3;
pub const REPLY_OVERHEAD: u64 = 3;

/// Text beyond this many bytes is counted at bytes/4 instead of tokenized.
pub const MAX_TEXT: usize = 256 * 1024;

/// Builds the tokenizer; call once at start-up, before the workers serve.
pub fn warm() -> bool {
    BPE.get_or_init(|| tiktoken_rs::o200k_base().ok()).is_some()
}

/// Tokens in `text`: BPE up to [`MAX_TEXT`] bytes, bytes/4 beyond (and for all of it if [`warm`] was not
/// called or failed: a core never builds the tokenizer).
pub fn count(text: &str) -> u64 {
    let Some(Some(bpe)) = BPE.get() else {
        return (text.len() as u64).div_ceil(4);
    };
    let mut cut = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let (head, tail) = text.split_at(cut);
    bpe.encode_ordinary(head).len() as u64 + (tail.len() as u64).div_ceil(4)
}

/// Input tokens of a chat request in `api` (the text its file names: [`Api::prompt_text`], text parts
/// only); `None` when the body is not a JSON object.
pub fn prompt_tokens(api: Api, body: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object()?;
    let mut text = String::new();
    let messages = api.prompt_text(obj, &mut text);
    // Chat formats wrap each message in a few tokens and prime the reply with a few more (OpenAI documents
    // about 3 and 3), so even an empty prompt is never estimated at zero.
    Some(count(&text) + MESSAGE_OVERHEAD * messages + REPLY_OVERHEAD)
}

/// Output tokens of generated text found in relayed SSE runs or in a non-streamed body of `api` (where the
/// text lives is the API's: [`Api::generated_text`]).
pub fn completion_tokens(api: Api, pieces: &[bytes::Bytes]) -> u64 {
    let mut text = String::new();
    for piece in pieces {
        push_generated_text(api, piece, &mut text);
        if text.len() > 4 * MAX_TEXT {
            break;
        }
    }
    count(&text)
}

/// Appends the generated text of one relayed piece (SSE events or a JSON body) to `out`.
pub fn push_generated_text(api: Api, piece: &[u8], out: &mut String) {
    for line in piece.split(|&b| b == b'\n' || b == b'\r') {
        let data = line
            .strip_prefix(b"data:")
            .map(|d| d.strip_prefix(b" ").unwrap_or(d))
            .unwrap_or(line);
        if data.first() != Some(&b'{') {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
            continue;
        };
        api.generated_text(&v, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_the_embedded_vocabulary() {
        assert!(warm());
        assert_eq!(count("hello world"), 2);
        assert_eq!(count(""), 0);
    }

    #[test]
    fn prompt_text_of_both_apis() {
        warm();
        let openai = br#"{"model":"m","messages":[{"role":"user","content":"hello world"},{"role":"user","content":[{"type":"text","text":"hello world"}]}]}"#;
        assert_eq!(
            prompt_tokens(Api::OpenAi, openai),
            Some(2 * count("hello world\n") + 2 * 3 + 3)
        );
        let anthropic = br#"{"model":"m","system":"hello world","messages":[{"role":"user","content":"hello world"}]}"#;
        assert_eq!(
            prompt_tokens(Api::Anthropic, anthropic),
            Some(2 * count("hello world\n") + 3 + 3)
        );
        assert_eq!(
            prompt_tokens(Api::OpenAi, br#"{"model":"m","messages":[]}"#),
            Some(3),
            "never zero"
        );
        assert_eq!(prompt_tokens(Api::OpenAi, b"not json"), None);
    }

    #[test]
    fn completion_text_of_streams_and_bodies() {
        warm();
        let openai = bytes::Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"hello \"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"world\"}}]}\n\ndata: [DONE]\n\n");
        let anthropic = bytes::Bytes::from_static(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hello world\"}}\n\n");
        let body = bytes::Bytes::from_static(
            br#"{"choices":[{"message":{"role":"assistant","content":"hello world"}}]}"#,
        );
        assert_eq!(
            completion_tokens(Api::OpenAi, &[openai]),
            count("hello world")
        );
        assert_eq!(
            completion_tokens(Api::Anthropic, &[anthropic]),
            count("hello world")
        );
        assert_eq!(
            completion_tokens(Api::OpenAi, &[body]),
            count("hello world")
        );
        assert_eq!(
            completion_tokens(
                Api::OpenAi,
                &[bytes::Bytes::from_static(b"data: {broken\n\n")]
            ),
            0
        );
    }
}
