//! Stream cut-off: ends a stream whose visible output reaches the output tokens its budget reservation
//! covers (a budget with `stream_cutoff = true` applied), so a request that set no output cap cannot spend
//! past what was reserved for it.
//!
//! Owns: [`StreamCutoff`], fed every run of SSE events the forward phase is about to relay. It counts the
//! generated text with the embedded tokenizer ([`crate::spend::estimate`]), but only once counting can matter: a
//! token is at least one byte, so while the stream's relayed bytes stay below the cap its tokens do too and
//! nothing is parsed. Past that point each event's text is counted; the run is cut after the event whose
//! text reaches the cap, and [`StreamCutoff::tail`] gives the well-formed end of the client's protocol
//! (each API's final events are its own: [`crate::providers::StreamEnd`]; e.g. OpenAI a final chunk with
//! `finish_reason: "length"` and `data: [DONE]`, Anthropic `message_delta` with `stop_reason: "max_tokens"`
//! and `message_stop`). The forward phase then closes the upstream connection (the provider stops generating)
//! and the account phase bills the estimate of what was generated.
//!
//! Limits: only visible text is counted. Reasoning tokens (OpenAI o-series, GPT-5) are billed as output but
//! never streamed, so for reasoning models the reservation's cap must be the request's own
//! `max_completion_tokens` or the route's `default_max_tokens` (which the provider enforces). Counting each
//! event separately can count a token more per event than the provider (where the tokenizer would have
//! merged across events; each event is counted as what it adds to the previous one, which catches the
//! common merge of a trailing space), so the cut errs early, never late. The provider may generate a few tokens more
//! before it notices the closed connection; they are not relayed, and the provider bills them.
//!
//! Fails: never; an event it cannot read counts as nothing. Cost: nothing below the byte bound; then one
//! small JSON parse and a tokenizer pass per event.

use crate::net::sse::split_events;
use crate::providers::{Api, StreamEnd};
use bytes::Bytes;

/// Counts a stream's visible output against a cap.
#[derive(Debug, Clone)]
pub struct StreamCutoff {
    cap: u64,
    /// Bytes relayed so far: an upper bound on the tokens in them.
    bytes: u64,
    /// Tokens counted (once counting started).
    tokens: u64,
    counting: bool,
    reached: bool,
    /// The stream's API.
    api: Api,
    /// What the API's final events need to know about the stream so far.
    end: StreamEnd,
    /// The text of the last event counted: the next event is counted as what it adds to this one, so
    /// tokens the tokenizer merges across events are not counted twice.
    tail: String,
}

impl StreamCutoff {
    pub fn new(api: Api, cap: u64) -> StreamCutoff {
        StreamCutoff {
            cap,
            api,
            end: StreamEnd::new(api),
            bytes: 0,
            tokens: 0,
            counting: false,
            reached: false,
            tail: String::new(),
        }
    }

    /// Whether the cap was reached: the stream ends after the run [`StreamCutoff::admit`] last returned.
    pub fn reached(&self) -> bool {
        self.reached
    }

    /// Output tokens counted (a lower bound of what was relayed until counting started: 0).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Observes a run of complete events about to be relayed, after `earlier` (what was relayed before,
    /// for the first count) and returns the run to relay: all of it, or the events up to the one that
    /// reaches the cap.
    pub fn admit(&mut self, run: Bytes, earlier: &[Bytes]) -> Bytes {
        if self.reached {
            return Bytes::new();
        }
        self.end.track(&run);
        if !self.counting {
            let after = self.bytes.saturating_add(run.len() as u64);
            if after < self.cap {
                self.bytes = after;
                return run;
            }
            self.counting = true;
            self.tokens = crate::spend::estimate::completion_tokens(self.api, earlier);
        }
        self.bytes = self.bytes.saturating_add(run.len() as u64);
        let base = run.as_ptr() as usize;
        for event in split_events(&run) {
            let mut text = std::mem::take(&mut self.tail);
            let before = crate::spend::estimate::count(&text);
            let start = text.len();
            crate::spend::estimate::push_generated_text(self.api, event, &mut text);
            if text.len() == start {
                self.tail = text;
                continue;
            }
            let added = crate::spend::estimate::count(&text)
                .saturating_sub(before)
                .max(1);
            self.tokens = self.tokens.saturating_add(added);
            self.tail = text[start..].to_owned();
            if self.tokens >= self.cap {
                self.reached = true;
                let end = event.as_ptr() as usize - base + event.len();
                return run.slice(..end);
            }
        }
        run
    }

    /// The events that end the client's stream after the cut, in its protocol.
    pub fn tail(&self) -> Vec<u8> {
        self.end.tail(self.tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai_run(words: &[&str]) -> Bytes {
        let mut s = String::new();
        for w in words {
            s.push_str(&format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{w}\"}},\"finish_reason\":null}}]}}\n\n"
            ));
        }
        Bytes::from(s)
    }

    #[test]
    fn below_the_byte_bound_nothing_is_counted_or_cut() {
        assert!(crate::spend::estimate::warm());
        let mut c = StreamCutoff::new(Api::OpenAi, 100_000);
        let run = openai_run(&[" Hello", " world"]);
        assert_eq!(c.admit(run.clone(), &[]), run);
        assert!(!c.reached());
        assert_eq!(c.tokens(), 0);
    }

    #[test]
    fn the_run_is_cut_after_the_event_that_reaches_the_cap() {
        assert!(crate::spend::estimate::warm());
        let mut c = StreamCutoff::new(Api::OpenAi, 3);
        let run = openai_run(&[" one", " two", " three", " four", " five"]);
        let out = c.admit(run.clone(), &[]);
        assert!(c.reached());
        assert_eq!(c.tokens(), 3);
        assert_eq!(out, openai_run(&[" one", " two", " three"]));
        // Nothing more passes.
        assert!(c.admit(openai_run(&[" six"]), &[]).is_empty());
        let tail = String::from_utf8(c.tail()).unwrap();
        let first = tail.lines().next().unwrap().strip_prefix("data: ").unwrap();
        let v: serde_json::Value = serde_json::from_str(first).unwrap();
        assert_eq!(v["id"], "chatcmpl-1");
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["created"], 7);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert!(tail.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn the_first_count_includes_what_was_relayed_before() {
        assert!(crate::spend::estimate::warm());
        let early = openai_run(&[" one", " two"]);
        let mut c = StreamCutoff::new(Api::OpenAi, early.len() as u64 + 10);
        assert_eq!(c.admit(early.clone(), &[]), early);
        let out = c.admit(openai_run(&[" three", " four"]), &[early]);
        // Counting started with the two earlier tokens; the cap (hundreds) is far away.
        assert_eq!(c.tokens(), 4);
        assert!(!c.reached());
        assert_eq!(out, openai_run(&[" three", " four"]));
    }

    #[test]
    fn anthropic_streams_end_with_their_own_final_events() {
        assert!(crate::spend::estimate::warm());
        let run = Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" one two\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" three\"}}\n\n");
        let mut c = StreamCutoff::new(Api::Anthropic, 2);
        let out = c.admit(run, &[]);
        assert!(c.reached());
        assert!(!String::from_utf8_lossy(&out).contains("three"));
        let tail = String::from_utf8(c.tail()).unwrap();
        assert!(tail.starts_with(
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}"
        ));
        assert!(tail.contains("\"stop_reason\":\"max_tokens\""));
        assert!(tail.contains("\"output_tokens\":2"));
        assert!(tail.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    }

    #[test]
    fn garbage_counts_as_nothing() {
        assert!(crate::spend::estimate::warm());
        let mut c = StreamCutoff::new(Api::OpenAi, 1);
        let out = c.admit(Bytes::from_static(b"data: {not json\n\n: comment\n\n"), &[]);
        assert!(!c.reached());
        assert_eq!(out.len(), 28);
    }
}
