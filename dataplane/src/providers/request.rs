//! The one strict read of a request body: the same bytes the provider will execute, read the way it will
//! read them, before anything is priced.
//!
//! Owns: [`Body::parse`], one pass over the body with `serde_json` that refuses what a lenient provider
//! would read differently from the gateway (invalid UTF-8 anywhere, a duplicated key at any depth: real
//! APIs keep the last one, so a gateway reading the first would price one request and forward another) and
//! keeps the top-level members the API files price as borrowed raw JSON with their byte spans
//! ([`Member`]), so a field the gateway sets is rewritten in place ([`Body::set_member`]) and never sent
//! twice. What each member means (caps, choices, tiers, tools) is the API file's: [`super::openai::view`],
//! [`super::anthropic::view`].
//!
//! Fails: 400 `invalid_body` naming the problem and where it is (`messages[2].content: duplicate key
//! "text"`). Cost: one validating pass (bench `hot_path/request_view` beside the previous probe, which read
//! only `model` and `stream`).

use std::borrow::Cow;
use std::fmt;

use bytes::{Bytes, BytesMut};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// Top-level members the API files read; every other member is only checked (UTF-8, no duplicates). Large
/// members (`messages`) are not kept: a kept member is walked twice, and the parts the API files look for
/// in them are found by a byte search over the body ([`Body::bytes`]).
const KEPT: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "service_tier",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "tools",
    "thinking",
    "mcp_servers",
    "container",
    "input",
    "dimensions",
    "encoding_format",
];

/// Top-level members the Responses API file reads ([`super::openai_responses::view`]), beside [`KEPT`]
/// (its large members, `input` and `instructions`, are not kept: only their JSON type is, in [`Body::kind`]).
const KEPT_RESPONSES: &[&str] = &[
    "max_output_tokens",
    "previous_response_id",
    "conversation",
    "background",
    "prompt",
    "truncation",
];

/// The JSON type of a top-level member's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool => "a boolean",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::Array => "an array",
            Kind::Object => "an object",
        }
    }
}

/// What a request will make the provider generate and bill, read from its body the way the API reads it
/// ([`super::Api::view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Billing {
    /// The output cap of each choice as the provider will apply it; `None`: uncapped (absent or `null`).
    pub cap: Option<u64>,
    /// How many choices the provider generates (OpenAI `n`); each can use the whole cap.
    pub choices: u64,
    /// A streamed response.
    pub stream: bool,
    /// The client asked for stream usage itself (OpenAI `stream_options.include_usage: true`).
    pub client_usage: bool,
    /// The request makes the provider read input the body does not show (Responses
    /// `previous_response_id`, `conversation`, `item_reference` items): its input is bounded by the
    /// model's context window, not by the body's bytes.
    pub stored_input: bool,
    /// The API's own bound on the input tokens, tighter than the body's bytes (embeddings count token ids
    /// exactly); `None`: the byte bound ([`crate::spend::max_cost::input_token_bound`]).
    pub input_tokens: Option<u64>,
}

/// A top-level member as it appears in the body.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// The value's JSON text (borrowed from the body).
    pub raw: &'a str,
    /// Byte range of the value in the body.
    pub start: usize,
    pub end: usize,
}

impl Member<'_> {
    pub fn is_null(&self) -> bool {
        self.raw == "null"
    }
}

/// A request body read strictly: the members the API files price, with their places.
#[derive(Debug)]
pub struct Body<'a> {
    pub bytes: &'a [u8],
    members: Vec<(&'static str, Member<'a>)>,
    /// Every top-level key, in order, with its value's JSON type.
    top: Vec<(Cow<'a, str>, Kind)>,
}

impl<'a> Body<'a> {
    /// Reads `bytes` strictly: valid UTF-8, a JSON object, no key twice in any object.
    pub fn parse(bytes: &'a [u8]) -> Result<Body<'a>> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            Error::invalid_body(format!(
                "request body is not valid UTF-8 (at byte {}): JSON text must be UTF-8",
                e.valid_up_to()
            ))
        })?;
        let mut de = serde_json::Deserializer::from_str(text);
        let mut path = Path::default();
        let (members, top) = Top {
            base: text.as_ptr() as usize,
            path: &mut path,
        }
        .deserialize(&mut de)
        .and_then(|m| de.end().map(|()| m))
        .map_err(|e| {
            let at = path.to_string();
            if at.is_empty() || e.is_syntax() || e.is_eof() {
                Error::invalid_body(format!("request body is not valid JSON: {e}"))
            } else {
                Error::invalid_body(format!("request body, at {at}: {e}"))
            }
        })?;
        Ok(Body {
            bytes,
            members,
            top,
        })
    }

    /// Every top-level key, in the order written.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.top.iter().map(|(k, _)| k.as_ref())
    }

    /// The JSON type of a top-level member's value, if the body has the member.
    pub fn kind(&self, name: &str) -> Option<Kind> {
        self.top.iter().find(|(k, _)| k == name).map(|(_, t)| *t)
    }

    /// A kept top-level member, if the body has it.
    pub fn get(&self, name: &str) -> Option<Member<'a>> {
        self.members
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, m)| *m)
    }

    /// A kept member read as a whole number: `Ok(None)` when absent or `null` (the providers read both as
    /// "not set"), 400 naming the field for anything else that is not a non-negative integer.
    pub fn count(&self, name: &str) -> Result<Option<u64>> {
        let Some(m) = self.get(name) else {
            return Ok(None);
        };
        if m.is_null() {
            return Ok(None);
        }
        m.raw.parse::<u64>().map(Some).map_err(|_| {
            Error::invalid_body(format!(
                "`{name}` must be a non-negative whole number or null, not {}",
                truncate(m.raw, 40)
            ))
        })
    }

    /// A kept member read as a string: `Ok(None)` when absent or `null`; 400 for another type.
    pub fn string(&self, name: &str) -> Result<Option<Cow<'a, str>>> {
        let Some(m) = self.get(name) else {
            return Ok(None);
        };
        if m.is_null() {
            return Ok(None);
        }
        // Borrowed from the body unless the string has escapes (the route phase splices a borrowed name).
        serde_json::from_str::<Key<'a>>(m.raw)
            .map(|k| Some(k.0))
            .map_err(|_| Error::invalid_body(format!("`{name}` must be a string")))
    }

    /// A kept member read as a boolean: absent or `null` is `false`.
    pub fn flag(&self, name: &str) -> Result<bool> {
        match self.get(name).map(|m| m.raw) {
            None | Some("null") | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(Error::invalid_body(format!(
                "`{name}` must be true, false or null, not {}",
                truncate(other, 40)
            ))),
        }
    }

    /// The body with every member named in `names` that it has set to `value` in place (one copy of the
    /// body), or, when it has none of them, `insert` spliced in after the opening brace. The provider then
    /// reads exactly `value`: never a second copy of the field, never the client's `null` beside it.
    pub fn set_member(&self, names: &[&str], value: &str, insert: &str) -> Result<Bytes> {
        let mut spans: Vec<(usize, usize)> = names
            .iter()
            .filter_map(|n| self.get(n))
            .map(|m| (m.start, m.end))
            .collect();
        if spans.is_empty() {
            return super::json::insert_member(
                &Bytes::copy_from_slice(self.bytes),
                insert.as_bytes(),
            )
            .ok_or_else(|| Error::invalid_body("request body is not a JSON object"));
        }
        spans.sort_unstable();
        let mut out = BytesMut::with_capacity(self.bytes.len() + value.len() * spans.len());
        let mut at = 0;
        for (start, end) in spans {
            out.extend_from_slice(&self.bytes[at..start]);
            out.extend_from_slice(value.as_bytes());
            at = end;
        }
        out.extend_from_slice(&self.bytes[at..]);
        Ok(out.freeze())
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Where the parse is, for the error message (`messages[2].content`).
#[derive(Default)]
struct Path<'de> {
    segs: Vec<Seg<'de>>,
    /// The keys of every object being read, innermost last: one stack for the whole parse, so checking
    /// an object for duplicates allocates nothing once it has grown.
    keys: Vec<Cow<'de, str>>,
}

impl<'de> Path<'de> {
    /// Adds `k` to the object whose keys start at `from`; the second of any key is refused.
    fn add_key<E: de::Error>(
        &mut self,
        from: usize,
        k: Cow<'de, str>,
    ) -> std::result::Result<(), E> {
        if self.keys[from..].contains(&k) {
            return Err(E::custom(format_args!(
                "duplicate key \"{}\": a provider reads the last one, so it is refused",
                truncate(&k, 64)
            )));
        }
        self.keys.push(k);
        Ok(())
    }
}

enum Seg<'de> {
    Key(Cow<'de, str>),
    Index(usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.segs.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A key as written: borrowed when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The top level: an object whose kept members are captured raw.
struct Top<'p, 'de> {
    base: usize,
    path: &'p mut Path<'de>,
}

/// What the top level yields: the kept members, and every key with its value's type.
type TopValue<'de> = (Vec<(&'static str, Member<'de>)>, Vec<(Cow<'de, str>, Kind)>);

impl<'de> DeserializeSeed<'de> for Top<'_, 'de> {
    type Value = TopValue<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Top<'_, 'de> {
    type Value = TopValue<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let from = self.path.keys.len();
        let mut kept = Vec::new();
        let mut top = Vec::new();
        while let Some(Key(k)) = map.next_key()? {
            self.path.segs.push(Seg::Key(k.clone()));
            self.path.add_key(from, k.clone())?;
            let kind;
            if let Some(name) = KEPT.iter().chain(KEPT_RESPONSES).find(|n| **n == k) {
                let raw: &'de RawValue = map.next_value()?;
                let text = raw.get();
                // Kept values are checked like every other (nested duplicates, e.g. in `stream_options`).
                let mut inner = serde_json::Deserializer::from_str(text);
                kind = Strict { path: self.path }
                    .deserialize(&mut inner)
                    .map_err(de::Error::custom)?;
                let start = (text.as_ptr() as usize).wrapping_sub(self.base);
                kept.push((
                    *name,
                    Member {
                        raw: text,
                        start,
                        end: start + text.len(),
                    },
                ));
            } else {
                kind = map.next_value_seed(Strict { path: self.path })?;
            }
            top.push((k, kind));
            self.path.segs.pop();
        }
        self.path.keys.truncate(from);
        Ok((kept, top))
    }
}

/// Any value below the top level: walked in full, refusing duplicate keys; yields the value's type.
struct Strict<'p, 'de> {
    path: &'p mut Path<'de>,
}

impl<'de> DeserializeSeed<'de> for Strict<'_, 'de> {
    type Value = Kind;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Kind, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_, 'de> {
    type Value = Kind;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<Kind, E> {
        Ok(Kind::Bool)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<Kind, E> {
        Ok(Kind::Number)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<Kind, E> {
        Ok(Kind::Number)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<Kind, E> {
        Ok(Kind::Number)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<Kind, E> {
        Ok(Kind::String)
    }
    fn visit_unit<E>(self) -> std::result::Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Kind, A::Error> {
        let mut i = 0;
        loop {
            self.path.segs.push(Seg::Index(i));
            if seq.next_element_seed(Strict { path: self.path })?.is_none() {
                self.path.segs.pop();
                return Ok(Kind::Array);
            }
            self.path.segs.pop();
            i += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Kind, A::Error> {
        let from = self.path.keys.len();
        while let Some(Key(k)) = map.next_key()? {
            self.path.segs.push(Seg::Key(k.clone()));
            self.path.add_key(from, k)?;
            map.next_value_seed(Strict { path: self.path })?;
            self.path.segs.pop();
        }
        self.path.keys.truncate(from);
        Ok(Kind::Object)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn err(body: &[u8]) -> String {
        Body::parse(body).unwrap_err().message.into_owned()
    }

    #[test]
    fn duplicates_are_refused_at_any_depth_with_their_place() {
        let e = err(br#"{"model":"m","n":1,"n":50}"#);
        assert!(
            e.contains("at n") && e.contains("duplicate key \"n\""),
            "{e}"
        );
        let e = err(br#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":"b","content":"c"}]}"#);
        assert!(e.contains("messages[1].content"), "{e}");
        let e =
            err(br#"{"model":"m","stream_options":{"include_usage":true,"include_usage":false}}"#);
        assert!(e.contains("stream_options"), "{e}");
        // Escaped and plain spellings of one key are the same key.
        let e = err(br#"{"model":"m","\u006e":1,"n":2}"#);
        assert!(e.contains("duplicate key \"n\""), "{e}");
    }

    #[test]
    fn invalid_utf8_and_trailing_garbage_are_refused() {
        let e = err(b"{\"model\":\"m\",\"messages\":[{\"content\":\"\xff\xfe\"}]}");
        assert!(e.contains("not valid UTF-8"), "{e}");
        let e = err(br#"{"model":"m"} {"model":"x"}"#);
        assert!(e.contains("not valid JSON"), "{e}");
        let e = err(br#"["model"]"#);
        assert!(e.contains("object"), "{e}");
    }

    #[test]
    fn numbers_and_nulls_are_read_as_the_provider_reads_them() {
        let b =
            Body::parse(br#"{"model":"m","n":null,"max_tokens":7,"max_completion_tokens":null}"#)
                .unwrap();
        assert_eq!(b.count("n").unwrap(), None);
        assert_eq!(b.count("max_tokens").unwrap(), Some(7));
        assert_eq!(b.count("max_completion_tokens").unwrap(), None);
        assert!(b.get("max_completion_tokens").unwrap().is_null());
        let b = Body::parse(br#"{"model":"m","n":2.5}"#).unwrap();
        assert!(b.count("n").unwrap_err().message.contains("`n`"));
        let b = Body::parse(br#"{"model":"m","n":-1}"#).unwrap();
        assert!(b.count("n").is_err());
    }

    #[test]
    fn a_set_member_replaces_every_copy_in_place_or_is_inserted_once() {
        let body = br#"{"model":"m","max_completion_tokens":null,"max_tokens":900,"x":1}"#;
        let b = Body::parse(body).unwrap();
        let out = b
            .set_member(
                &["max_tokens", "max_completion_tokens"],
                "64",
                "\"max_completion_tokens\":64,",
            )
            .unwrap();
        assert_eq!(
            &out[..],
            br#"{"model":"m","max_completion_tokens":64,"max_tokens":64,"x":1}"#
        );
        let b = Body::parse(br#"{"model":"m"}"#).unwrap();
        let out = b
            .set_member(&["max_tokens"], "64", "\"max_tokens\":64,")
            .unwrap();
        assert_eq!(&out[..], br#"{"max_tokens":64,"model":"m"}"#);
        // The result reads back strictly: no duplicate was made.
        Body::parse(&out).unwrap();
    }
}
