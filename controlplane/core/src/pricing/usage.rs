//! Token usage of one request, normalised across providers so one pricing function serves both.
//!
//! Owns: [`Usage`] and the two constructors that translate each provider's usage block into it.
//! Fails: never; inconsistent counts from a provider (more cached tokens than prompt tokens, say) are
//! clamped, never a panic or an underflow.
//! Cost: a handful of integer operations; `Usage` is `Copy` and never allocates.

use serde::Serialize;

/// Normalised token counts of one request. Every token is in exactly one billing class:
///
/// - `input_tokens`: input that was neither read from nor written to the prompt cache (billed at `input`);
/// - `cached_input_tokens`: input read from the prompt cache (cache hits, billed at `cached_input`);
/// - `cache_write_5m_tokens` / `cache_write_1h_tokens`: input written to the prompt cache with a 5-minute or
///   1-hour lifetime (Anthropic; billed at `cache_write_5m` / `cache_write_1h`);
/// - `output_tokens`: every generated token, **including reasoning/thinking tokens**, which providers bill
///   as output (billed at `output`).
///
/// `reasoning_tokens` is informational: the part of `output_tokens` that was reasoning, never billed on
/// its own. `estimated` is true when the counts were estimated by the gateway (e.g. a stream cut short
/// before the provider reported usage) rather than reported by the provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_5m_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub estimated: bool,
}

impl Usage {
    /// From an OpenAI usage block: `prompt_tokens` **includes** `prompt_tokens_details.cached_tokens`, and
    /// `completion_tokens` **includes** `completion_tokens_details.reasoning_tokens`. OpenAI has no cache
    /// writes. A cached count above the prompt count is clamped to it (all input cached); a reasoning count
    /// above the completion count is clamped likewise.
    pub fn from_openai(
        prompt_tokens: u64,
        cached_tokens: u64,
        completion_tokens: u64,
        reasoning_tokens: u64,
    ) -> Usage {
        let cached = cached_tokens.min(prompt_tokens);
        Usage {
            input_tokens: prompt_tokens - cached,
            cached_input_tokens: cached,
            cache_write_5m_tokens: 0,
            cache_write_1h_tokens: 0,
            output_tokens: completion_tokens,
            reasoning_tokens: reasoning_tokens.min(completion_tokens),
            estimated: false,
        }
    }

    /// From an Anthropic usage block: `input_tokens` **excludes** both cache reads
    /// (`cache_read_input_tokens`) and cache writes (`cache_creation_input_tokens`); `output_tokens`
    /// includes thinking, which Anthropic does not count separately (so `reasoning_tokens` is 0).
    ///
    /// The 5m/1h split comes from `cache_creation.ephemeral_5m_input_tokens` /
    /// `ephemeral_1h_input_tokens`. When neither is present, all cache creation is 5-minute (the default
    /// lifetime). When the split accounts for fewer tokens than `cache_creation_input_tokens`, the
    /// remainder is billed as 5-minute writes; when it accounts for more, the split is trusted.
    pub fn from_anthropic(
        input_tokens: u64,
        cache_creation_input_tokens: u64,
        cache_5m: Option<u64>,
        cache_1h: Option<u64>,
        cache_read_input_tokens: u64,
        output_tokens: u64,
    ) -> Usage {
        let (w5, w1) = match (cache_5m, cache_1h) {
            (None, None) => (cache_creation_input_tokens, 0),
            (a, b) => {
                let (a, b) = (a.unwrap_or(0), b.unwrap_or(0));
                let rest = cache_creation_input_tokens.saturating_sub(a.saturating_add(b));
                (a.saturating_add(rest), b)
            }
        };
        Usage {
            input_tokens,
            cached_input_tokens: cache_read_input_tokens,
            cache_write_5m_tokens: w5,
            cache_write_1h_tokens: w1,
            output_tokens,
            reasoning_tokens: 0,
            estimated: false,
        }
    }

    /// Marks the counts as estimated by the gateway.
    pub fn estimated(self) -> Usage {
        Usage {
            estimated: true,
            ..self
        }
    }

    /// Every input token of the request: uncached + cache reads + cache writes. This is the count that
    /// long-context price tiers compare against their threshold. Saturates rather than overflowing.
    pub fn total_input_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cached_input_tokens)
            .saturating_add(self.cache_write_5m_tokens)
            .saturating_add(self.cache_write_1h_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_prompt_includes_cached_and_completion_includes_reasoning() {
        let u = Usage::from_openai(1_000, 600, 500, 300);
        assert_eq!(u.input_tokens, 400);
        assert_eq!(u.cached_input_tokens, 600);
        assert_eq!(u.output_tokens, 500);
        assert_eq!(u.reasoning_tokens, 300);
        assert_eq!(u.cache_write_5m_tokens + u.cache_write_1h_tokens, 0);
        assert_eq!(u.total_input_tokens(), 1_000);
        assert!(!u.estimated);
    }

    #[test]
    fn openai_inconsistent_counts_are_clamped() {
        let u = Usage::from_openai(100, 150, 10, 20);
        assert_eq!((u.input_tokens, u.cached_input_tokens), (0, 100));
        assert_eq!(u.reasoning_tokens, 10);
    }

    #[test]
    fn anthropic_input_excludes_cache_reads_and_writes() {
        let u = Usage::from_anthropic(50, 3_000, Some(1_000), Some(2_000), 10_000, 700);
        assert_eq!(u.input_tokens, 50);
        assert_eq!(u.cached_input_tokens, 10_000);
        assert_eq!(u.cache_write_5m_tokens, 1_000);
        assert_eq!(u.cache_write_1h_tokens, 2_000);
        assert_eq!(u.output_tokens, 700);
        assert_eq!(u.total_input_tokens(), 13_050);
    }

    #[test]
    fn anthropic_without_split_is_all_5m() {
        let u = Usage::from_anthropic(10, 4_000, None, None, 0, 1);
        assert_eq!(
            (u.cache_write_5m_tokens, u.cache_write_1h_tokens),
            (4_000, 0)
        );
        // A partial split: the unaccounted remainder is 5m.
        let u = Usage::from_anthropic(10, 4_000, None, Some(1_000), 0, 1);
        assert_eq!(
            (u.cache_write_5m_tokens, u.cache_write_1h_tokens),
            (3_000, 1_000)
        );
        // A split larger than the total is trusted.
        let u = Usage::from_anthropic(10, 100, Some(80), Some(80), 0, 1);
        assert_eq!((u.cache_write_5m_tokens, u.cache_write_1h_tokens), (80, 80));
    }

    #[test]
    fn total_input_saturates() {
        let u = Usage {
            input_tokens: u64::MAX,
            cached_input_tokens: 1,
            ..Usage::default()
        };
        assert_eq!(u.total_input_tokens(), u64::MAX);
        assert!(u.estimated().estimated);
    }
}
