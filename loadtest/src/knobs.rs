//! Per-request settings from `x-mock-*` headers and the token arithmetic.

use std::time::Duration;

use hyper::HeaderMap;

use crate::MockDefaults;

/// The cycling word list of the output text; token `i` is `WORDS[i % 16]`
/// followed by one space.
pub const WORDS: [&str; 16] = [
    "Hello",
    "from",
    "the",
    "Tollgate",
    "mock",
    "provider",
    "this",
    "is",
    "a",
    "deterministic",
    "stream",
    "of",
    "words",
    "for",
    "load",
    "tests",
];

/// The same words with their trailing space, to avoid formatting per token.
pub(crate) const TOKENS: [&str; 16] = [
    "Hello ",
    "from ",
    "the ",
    "Tollgate ",
    "mock ",
    "provider ",
    "this ",
    "is ",
    "a ",
    "deterministic ",
    "stream ",
    "of ",
    "words ",
    "for ",
    "load ",
    "tests ",
];

/// Output token `i` as sent on the wire.
pub(crate) fn token(i: u64) -> &'static str {
    TOKENS[(i % TOKENS.len() as u64) as usize]
}

/// The whole output text of `n` tokens.
pub(crate) fn text(n: u64) -> String {
    let mut s = String::with_capacity(n as usize * 8);
    for i in 0..n {
        s.push_str(token(i));
    }
    s
}

/// The `x-mock-*` request headers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Knobs {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_5m_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub token_delay_ms: Option<u64>,
    pub first_byte_delay_ms: u64,
    pub status: Option<u16>,
    pub disconnect_after: Option<u64>,
    pub malformed_sse: bool,
    pub omit_usage: bool,
    /// `x-mock-real-api`: real-API mode on or off for this request.
    pub real_api: Option<bool>,
}

fn num(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

fn flag(v: &[u8]) -> bool {
    !matches!(v, b"" | b"0" | b"false" | b"no")
}

impl Knobs {
    pub(crate) fn from_headers(headers: &HeaderMap) -> Self {
        let mut k = Self::default();
        for (name, value) in headers {
            let Some(knob) = name.as_str().strip_prefix("x-mock-") else {
                continue;
            };
            let v = value.as_bytes();
            match knob {
                "input-tokens" => k.input_tokens = num(v).or(k.input_tokens),
                "output-tokens" => k.output_tokens = num(v).or(k.output_tokens),
                "cached-tokens" => k.cached_tokens = num(v).unwrap_or(k.cached_tokens),
                "reasoning-tokens" => k.reasoning_tokens = num(v).unwrap_or(k.reasoning_tokens),
                "cache-read-tokens" => k.cache_read_tokens = num(v).unwrap_or(k.cache_read_tokens),
                "cache-write-5m-tokens" => {
                    k.cache_write_5m_tokens = num(v).unwrap_or(k.cache_write_5m_tokens)
                }
                "cache-write-1h-tokens" => {
                    k.cache_write_1h_tokens = num(v).unwrap_or(k.cache_write_1h_tokens)
                }
                "token-delay-ms" => k.token_delay_ms = num(v).or(k.token_delay_ms),
                "first-byte-delay-ms" => {
                    k.first_byte_delay_ms = num(v).unwrap_or(k.first_byte_delay_ms)
                }
                "status" => {
                    k.status = num(v)
                        .and_then(|s| u16::try_from(s).ok())
                        .filter(|s| (400..=599).contains(s))
                        .or(k.status)
                }
                "disconnect-after" => k.disconnect_after = num(v).or(k.disconnect_after),
                "malformed-sse" => k.malformed_sse = flag(v),
                "omit-usage" => k.omit_usage = flag(v),
                "real-api" => k.real_api = Some(flag(v)),
                _ => {}
            }
        }
        k
    }
}

/// Everything a response needs to know about its numbers and behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub input: u64,
    /// Output tokens of each choice.
    pub output: u64,
    /// Choices generated (OpenAI `n` in real-API mode; otherwise 1).
    pub choices: u64,
    /// Output was cut short by the request's `max_tokens`.
    pub capped: bool,
    pub cached: u64,
    pub reasoning: u64,
    pub cache_read: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub token_delay: Duration,
    pub disconnect_after: Option<u64>,
    pub malformed_sse: bool,
    pub omit_usage: bool,
}

impl Plan {
    pub(crate) fn new(
        defaults: &MockDefaults,
        knobs: &Knobs,
        body_len: usize,
        max_tokens: Option<u64>,
    ) -> Self {
        let input = knobs
            .input_tokens
            .unwrap_or_else(|| (body_len as u64).div_ceil(4));
        let wanted = knobs.output_tokens.unwrap_or(defaults.output_tokens);
        let (output, capped) = match max_tokens {
            Some(m) if m < wanted => (m, true),
            _ => (wanted, false),
        };
        Self {
            input,
            output,
            choices: 1,
            capped,
            cached: knobs.cached_tokens.min(input),
            reasoning: knobs.reasoning_tokens.min(output),
            cache_read: knobs.cache_read_tokens,
            cache_write_5m: knobs.cache_write_5m_tokens,
            cache_write_1h: knobs.cache_write_1h_tokens,
            token_delay: knobs
                .token_delay_ms
                .map_or(defaults.token_delay, Duration::from_millis),
            disconnect_after: knobs.disconnect_after,
            malformed_sse: knobs.malformed_sse,
            omit_usage: knobs.omit_usage,
        }
    }

    /// Output tokens over all choices, as billed.
    pub(crate) fn total_output(&self) -> u64 {
        self.output.saturating_mul(self.choices)
    }

    /// Index of the token event before which the malformed event goes.
    pub(crate) fn malformed_at(&self) -> Option<u64> {
        self.malformed_sse.then_some(self.output / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn input_tokens_round_up_body_bytes() {
        let d = MockDefaults::default();
        let k = Knobs::default();
        assert_eq!(Plan::new(&d, &k, 0, None).input, 0);
        assert_eq!(Plan::new(&d, &k, 1, None).input, 1);
        assert_eq!(Plan::new(&d, &k, 4, None).input, 1);
        assert_eq!(Plan::new(&d, &k, 5, None).input, 2);
        assert_eq!(Plan::new(&d, &k, 400, None).input, 100);
    }

    #[test]
    fn headers_override_and_clamp() {
        let d = MockDefaults::default();
        let k = Knobs::from_headers(&headers(&[
            ("x-mock-input-tokens", "1000"),
            ("x-mock-output-tokens", "40"),
            ("x-mock-cached-tokens", "5000"),
            ("x-mock-reasoning-tokens", "50"),
            ("x-mock-status", "429"),
            ("x-mock-omit-usage", "1"),
            ("x-mock-malformed-sse", "0"),
            ("x-mock-token-delay-ms", "bogus"),
        ]));
        assert_eq!(k.status, Some(429));
        let p = Plan::new(&d, &k, 10, None);
        assert_eq!(p.input, 1000);
        assert_eq!(p.output, 40);
        assert!(!p.capped);
        assert_eq!(p.cached, 1000);
        assert_eq!(p.reasoning, 40);
        assert!(p.omit_usage);
        assert!(!p.malformed_sse);
        assert_eq!(p.token_delay, Duration::ZERO);
    }

    #[test]
    fn max_tokens_caps_only_when_smaller() {
        let d = MockDefaults::default();
        let k = Knobs::default();
        let p = Plan::new(&d, &k, 10, Some(5));
        assert_eq!((p.output, p.capped), (5, true));
        let p = Plan::new(&d, &k, 10, Some(16));
        assert_eq!((p.output, p.capped), (16, false));
        let p = Plan::new(&d, &k, 10, Some(100));
        assert_eq!((p.output, p.capped), (16, false));
    }

    #[test]
    fn status_outside_error_range_is_ignored() {
        let k = Knobs::from_headers(&headers(&[("x-mock-status", "200")]));
        assert_eq!(k.status, None);
        let k = Knobs::from_headers(&headers(&[("x-mock-status", "529")]));
        assert_eq!(k.status, Some(529));
    }

    #[test]
    fn text_cycles_words() {
        assert_eq!(text(3), "Hello from the ");
        assert_eq!(token(16), "Hello ");
        assert_eq!(text(17).split(' ').count(), 18);
        for (w, t) in WORDS.iter().zip(TOKENS.iter()) {
            assert_eq!(format!("{w} "), *t);
        }
    }
}
