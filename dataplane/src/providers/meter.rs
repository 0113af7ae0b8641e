//! Token usage read from provider responses, on the hot path.
//!
//! Owns: [`UsageMeter`], fed every upstream response body the forward phase relays: whole JSON bodies for
//! non-streamed responses, runs of complete SSE events for streams. A cheap byte search (`memmem` for
//! `"usage"`) skips every event that cannot carry usage (the token deltas); only the few that can (OpenAI's
//! final usage chunk, Anthropic's `message_start` and `message_delta`) are parsed, with `simd-json` into
//! borrowed structs (the event's data is copied once into a scratch buffer, because simd-json parses in place).
//!
//! The skeleton is shared; what a usage object looks like is each API's: [`super::Meter`] dispatches the
//! parse to [`super::openai::Meter`] or [`super::anthropic::Meter`], which normalise into [`Usage`] with the
//! control plane's constructors.
//!
//! Fails: never. Malformed or hostile JSON in an event is counted in [`UsageMeter::parse_failures`] and
//! skipped; usage that never arrives leaves [`UsageMeter::usage`] `None`, and the account phase estimates.
//! Cost: a `memmem` scan per event (~10 ns for a 200-byte delta); one small parse per usage event.

use tollgate_core::Usage;

use super::json::carries_usage;
use super::{Api, Meter};
use crate::net::sse::split_events;

/// Accumulates usage for one response.
#[derive(Debug)]
pub struct UsageMeter {
    counts: Meter,
    parse_failures: u32,
    scratch: Vec<u8>,
}

impl UsageMeter {
    pub fn new(api: impl Into<Api>) -> UsageMeter {
        UsageMeter {
            counts: Meter::new(api.into()),
            parse_failures: 0,
            scratch: Vec::new(),
        }
    }

    /// Events whose usage could not be parsed.
    pub fn parse_failures(&self) -> u32 {
        self.parse_failures
    }

    /// A whole non-streamed JSON response body.
    pub fn observe_json(&mut self, body: &[u8]) {
        if !carries_usage(body) {
            return;
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(body);
        self.parse_scratch();
    }

    /// A run of complete SSE events, as the framer hands them out.
    pub fn observe_events(&mut self, run: &[u8]) {
        if !carries_usage(run) {
            return;
        }
        for event in split_events(run) {
            if !carries_usage(event) {
                continue;
            }
            // The event's data: its `data:` lines joined by newlines (per the SSE grammar).
            self.scratch.clear();
            for line in event.split(|&b| b == b'\n' || b == b'\r') {
                if let Some(rest) = line.strip_prefix(b"data:") {
                    if !self.scratch.is_empty() {
                        self.scratch.push(b'\n');
                    }
                    self.scratch
                        .extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
                }
            }
            if !self.scratch.is_empty() {
                self.parse_scratch();
            }
        }
    }

    fn parse_scratch(&mut self) {
        if !self.counts.observe(&mut self.scratch) {
            self.parse_failures = self.parse_failures.saturating_add(1);
        }
    }

    /// The usage the provider reported, once it is complete: OpenAI's usage object, or Anthropic's input
    /// (message_start) together with output (message_delta or the message itself).
    pub fn usage(&self) -> Option<Usage> {
        self.counts.usage()
    }

    /// What is known so far: reported input (if any) and reported output (if any), for a stream that ended
    /// before its usage was complete.
    pub fn partial(&self) -> (Option<u64>, Option<u64>) {
        self.counts.partial()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::openai::strip_stream_usage as strip_openai_usage;
    use tollgate_core::ProviderKind;

    const OPENAI_STREAM: &[u8] = b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":300,\"total_tokens\":1500,\"prompt_tokens_details\":{\"cached_tokens\":1000,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":120,\"audio_tokens\":0}}}\n\n\
data: [DONE]\n\n";

    const ANTHROPIC_STREAM: &[u8] = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":50,\"cache_creation_input_tokens\":3000,\"cache_read_input_tokens\":7000,\"cache_creation\":{\"ephemeral_5m_input_tokens\":1000,\"ephemeral_1h_input_tokens\":2000},\"output_tokens\":1}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"usage\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":42}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    #[test]
    fn openai_stream_usage_with_cache_and_reasoning() {
        let mut m = UsageMeter::new(ProviderKind::OpenAi);
        m.observe_events(OPENAI_STREAM);
        let u = m.usage().unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.output_tokens,
                u.reasoning_tokens
            ),
            (200, 1000, 300, 120)
        );
        assert_eq!(m.parse_failures(), 0);
    }

    #[test]
    fn anthropic_stream_usage_with_cache_writes_and_reads() {
        let mut m = UsageMeter::new(ProviderKind::Anthropic);
        m.observe_events(ANTHROPIC_STREAM);
        let u = m.usage().unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.cache_write_5m_tokens,
                u.cache_write_1h_tokens,
                u.cached_input_tokens,
                u.output_tokens
            ),
            (50, 1000, 2000, 7000, 42)
        );
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_usage() {
        for (kind, stream) in [
            (ProviderKind::OpenAi, OPENAI_STREAM),
            (ProviderKind::Anthropic, ANTHROPIC_STREAM),
        ] {
            let want = {
                let mut m = UsageMeter::new(kind);
                m.observe_events(stream);
                m.usage().unwrap()
            };
            for size in 1..stream.len() {
                let mut framer = crate::net::sse::SseFramer::new();
                let mut m = UsageMeter::new(kind);
                for piece in stream.chunks(size) {
                    if let Some(run) = framer.push(bytes::Bytes::copy_from_slice(piece)) {
                        m.observe_events(&run);
                    }
                }
                assert_eq!(m.usage(), Some(want), "split {size}");
            }
        }
    }

    #[test]
    fn non_streamed_bodies() {
        let mut m = UsageMeter::new(ProviderKind::OpenAi);
        m.observe_json(br#"{"id":"x","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#);
        assert_eq!(m.usage().unwrap().output_tokens, 5);
        let mut m = UsageMeter::new(ProviderKind::Anthropic);
        m.observe_json(br#"{"type":"message","content":[],"usage":{"input_tokens":7,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":3}}"#);
        let u = m.usage().unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (7, 3));
    }

    #[test]
    fn garbage_and_truncation_never_panic_or_invent_usage() {
        let mut m = UsageMeter::new(ProviderKind::OpenAi);
        m.observe_events(b"data: {\"usage\":{\"prompt_tokens\":\n\ndata: {\"usage\":{\"prompt_tokens\":-1}}\n\ndata: {\"usage\":{\"prompt_tokens\":99999999999999999999999}}\n\n");
        assert_eq!(m.usage(), None);
        assert_eq!(m.parse_failures(), 3);
        let mut m = UsageMeter::new(ProviderKind::Anthropic);
        // message_start only: input known, output never arrived (its output_tokens: 1 is a placeholder).
        let first_event = ANTHROPIC_STREAM
            .windows(2)
            .position(|w| w == b"\n\n")
            .unwrap()
            + 2;
        m.observe_events(&ANTHROPIC_STREAM[..first_event]);
        assert_eq!(m.usage(), None);
        assert_eq!(m.partial(), (Some(50), None));
        for i in 0..OPENAI_STREAM.len() {
            let mut v = OPENAI_STREAM.to_vec();
            v[i] = b'{';
            let mut m = UsageMeter::new(ProviderKind::OpenAi);
            m.observe_events(&v);
        }
    }

    #[test]
    fn usage_the_client_did_not_ask_for_is_removed() {
        let out = strip_openai_usage(bytes::Bytes::from_static(OPENAI_STREAM)).unwrap();
        assert_eq!(
            &out[..],
            &b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n"[..]
        );
        let plain = bytes::Bytes::from_static(b"data: {\"choices\":[]}\n\n");
        assert_eq!(
            strip_openai_usage(plain.clone()).unwrap().as_ptr(),
            plain.as_ptr(),
            "no copy when nothing to do"
        );
        assert_eq!(
            strip_openai_usage(bytes::Bytes::from_static(
                b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n"
            )),
            None
        );
    }

    #[test]
    fn only_usage_objects_are_parsed() {
        assert!(carries_usage(br#"{"usage":{"prompt_tokens":1}}"#));
        assert!(carries_usage(br#"{"usage" :  {"prompt_tokens":1}}"#));
        assert!(carries_usage(br#"{"a":"\"usage\"","usage":{}}"#));
        assert!(!carries_usage(br#"{"choices":[],"usage":null}"#));
        assert!(!carries_usage(br#"{"text":"usage"}"#));
        assert!(!carries_usage(br#"{"usage""#));
    }

    #[test]
    fn token_deltas_are_not_parsed() {
        // A delta that merely says "usage" in its text is scanned, parsed once, and yields nothing.
        let mut m = UsageMeter::new(ProviderKind::OpenAi);
        m.observe_events(b"data: {\"choices\":[{\"delta\":{\"content\":\"no usage here\"}}]}\n\n");
        assert_eq!(m.usage(), None);
        assert_eq!(m.parse_failures(), 0);
    }
}
