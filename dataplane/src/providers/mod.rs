//! What each provider API means on the wire.
//!
//! [`meter`]: token usage read from OpenAI and Anthropic responses.

pub mod meter;
