//! Byte and JSON helpers the API files share: splicing a member into a request body, finding `"usage"`
//! in events, walking text parts, reading an event's `data:` JSON.
//!
//! Owns nothing per API; imports nothing from `providers` (the API files and `meter` import it, so no
//! circles). Fails: never; malformed input gives `None`, `false` or no text. Cost: `memmem` scans on the hot
//! path (`mentions_usage`, `carries_usage`), one splice copy for `insert_member`; the JSON walkers run only on
//! estimate and cut-off paths.

use bytes::{Bytes, BytesMut};
use memchr::memmem;

/// The searcher for `"usage"`, built once (building one per call costs more than the search itself).
static USAGE_KEY: std::sync::LazyLock<memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memmem::Finder::new(b"\"usage\""));

/// Whether `"usage"` appears at all (the stripping pass looks for `"usage":null` members too).
pub fn mentions_usage(event: &[u8]) -> bool {
    USAGE_KEY.find(event).is_some()
}

/// Whether a `"usage"` key holds an object: the only events worth parsing. OpenAI streams that include usage
/// put `"usage":null` in every chunk, so finding the key alone would parse every token delta.
pub fn carries_usage(event: &[u8]) -> bool {
    let mut at = 0;
    while let Some(i) = USAGE_KEY.find(&event[at..]) {
        let rest = &event[at + i + b"\"usage\"".len()..];
        let mut j = 0;
        while rest.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        if rest.get(j) == Some(&b':') {
            j += 1;
            while rest.get(j).is_some_and(u8::is_ascii_whitespace) {
                j += 1;
            }
            if rest.get(j) == Some(&b'{') {
                return true;
            }
        }
        at += i + 1;
    }
    false
}

/// Inserts `member` (`"name":value,`) right after the body's opening brace: one splice, no re-encode.
/// `None` when the body does not start with an object.
pub fn insert_member(body: &Bytes, member: &[u8]) -> Option<Bytes> {
    let open = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .filter(|&i| body[i] == b'{')?;
    // `{}` gets no trailing comma.
    let empty = body[open + 1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let member = if empty {
        member.strip_suffix(b",").unwrap_or(member)
    } else {
        member
    };
    let mut out = BytesMut::with_capacity(body.len() + member.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(member);
    out.extend_from_slice(&body[open + 1..]);
    Some(out.freeze())
}

/// Appends the text in `v` (a string, or an array of strings / `{"text": ...}` parts); `sep` ends each
/// piece with a newline (between prompt messages; generated deltas are concatenated as they were streamed).
pub fn push_text(v: &serde_json::Value, out: &mut String, sep: bool) {
    match v {
        serde_json::Value::String(s) => {
            out.push_str(s);
            if sep {
                out.push('\n');
            }
        }
        serde_json::Value::Array(parts) => {
            for p in parts {
                match p {
                    serde_json::Value::Object(o) => {
                        if let Some(t) = o.get("text") {
                            push_text(t, out, sep);
                        }
                    }
                    other => push_text(other, out, sep),
                }
            }
        }
        _ => {}
    }
}

/// Appends `messages[].content` (text parts only, one per line) and returns the number of messages.
pub fn push_messages(obj: &serde_json::Map<String, serde_json::Value>, out: &mut String) -> u64 {
    let mut messages = 0u64;
    for m in obj
        .get("messages")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
    {
        messages += 1;
        if let Some(c) = m.get("content") {
            push_text(c, out, true);
        }
    }
    messages
}

/// The JSON of an event's `data:` line.
pub fn data_json(event: &[u8]) -> Option<serde_json::Value> {
    event
        .split(|&b| b == b'\n' || b == b'\r')
        .find_map(|l| l.strip_prefix(b"data:"))
        .and_then(|d| serde_json::from_slice(d.strip_prefix(b" ").unwrap_or(d)).ok())
}

/// Occurrences of `key` used as an object key (a key's quotes are never escaped, so text inside a string
/// value cannot match) (followed by optional whitespace and a colon).
pub fn key_count(body: &[u8], key: &[u8]) -> u64 {
    memmem::find_iter(body, key)
        .filter(|&i| {
            body[i + key.len()..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                == Some(&b':')
        })
        .count() as u64
}

/// Occurrences of `"type": <value>` (whitespace allowed around the colon).
pub fn type_count(body: &[u8], value: &[u8]) -> u64 {
    memmem::find_iter(body, b"\"type\"")
        .filter(|&i| {
            let rest = &body[i + 6..];
            let Some(colon) = rest.iter().position(|b| !b.is_ascii_whitespace()) else {
                return false;
            };
            if rest[colon] != b':' {
                return false;
            }
            let after = &rest[colon + 1..];
            let start = after
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(after.len());
            after[start..].starts_with(value)
        })
        .count() as u64
}
