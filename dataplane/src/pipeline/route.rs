//! Phase 5, route: which endpoint was called, which model it names, and which provider serves it.
//!
//! Owns: endpoint classification by method and path, the one parse of the request body (`serde_json` into a
//! borrowed probe that skips every field but `model` and `stream`, so nothing is allocated for the prompt),
//! route lookup (exact names before globs), and the upstream body: the client's bytes unchanged (a refcount,
//! no copy) unless the route renames the model, in which case exactly one splice replaces the name.
//!
//! Fails: bad JSON or a missing `model` is 400, an unrouted model 404, a model whose provider speaks the
//! other API 400 naming the endpoint to call. Cost: one validating pass over the body (~1 GB/s).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use tollgate_core::ProviderKind;

use crate::error::{ApiShape, Error, Result};
use crate::net::http1::{Method, RequestHead};
use crate::runtime::snapshot::{ProviderRuntime, Snapshot};

/// What the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Messages,
    Models,
    Healthz,
    Readyz,
}

impl Endpoint {
    pub fn api(self) -> ApiShape {
        match self {
            Endpoint::Messages => ApiShape::Anthropic,
            _ => ApiShape::OpenAi,
        }
    }

    pub fn provider_kind(self) -> Option<ProviderKind> {
        match self {
            Endpoint::ChatCompletions => Some(ProviderKind::OpenAi),
            Endpoint::Messages => Some(ProviderKind::Anthropic),
            _ => None,
        }
    }
}

/// Classifies the request. Anthropic-shaped errors for `/v1/messages` even when the method is wrong.
pub fn endpoint(head: &RequestHead) -> std::result::Result<Endpoint, (Error, ApiShape)> {
    let (ep, allowed) = match head.path() {
        "/v1/chat/completions" | "/chat/completions" => (Endpoint::ChatCompletions, Method::Post),
        "/v1/messages" => (Endpoint::Messages, Method::Post),
        "/v1/models" | "/models" => (Endpoint::Models, Method::Get),
        "/healthz" => (Endpoint::Healthz, Method::Get),
        "/readyz" => (Endpoint::Readyz, Method::Get),
        other => {
            let shape = if head.header("anthropic-version").is_some() {
                ApiShape::Anthropic
            } else {
                ApiShape::OpenAi
            };
            return Err((
                Error::not_found(format!("no such endpoint: {}", truncate(other, 128))),
                shape,
            ));
        }
    };
    let ok = head.method == allowed || (allowed == Method::Get && head.method == Method::Head);
    if ok {
        Ok(ep)
    } else {
        Err((
            Error::method_not_allowed(format!(
                "{} {} is not supported; use {}",
                head.method_str(),
                head.path(),
                match allowed {
                    Method::Get => "GET",
                    _ => "POST",
                }
            )),
            ep.api(),
        ))
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A string that borrows from the body unless it contains escapes. (serde only borrows a `Cow` that is the
/// field's own type, not one inside an `Option`, hence the newtype.)
#[derive(Deserialize)]
struct Name<'a>(#[serde(borrow)] Cow<'a, str>);

/// The fields of a chat request the gateway reads; serde skips the rest without allocating.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<Name<'a>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The outcome of routing a chat request.
#[derive(Debug)]
pub struct Routed {
    pub model: String,
    pub stream: bool,
    pub provider: Arc<ProviderRuntime>,
    pub route: String,
    pub upstream_model: Option<String>,
    /// The body to send upstream.
    pub body: Bytes,
    /// Tollgate asked the provider for usage the client did not ask for (OpenAI `stream_options`), so the
    /// usage chunk and the `"usage":null` fields must be taken out of the client's stream.
    pub strip_usage: bool,
    /// The larger of the body's `max_tokens` and `max_completion_tokens`, when it sets either.
    pub max_tokens: Option<u64>,
    /// The route's `default_max_tokens`.
    pub default_max_tokens: Option<u64>,
}

/// Routes a chat request by the `model` in its body.
pub fn route(snap: &Snapshot, ep: Endpoint, body: &Bytes) -> Result<Routed> {
    if body.is_empty() {
        return Err(Error::invalid_body(
            "request body is empty; expected a JSON object",
        ));
    }
    let probe: Probe<'_> = serde_json::from_slice(body).map_err(|e| {
        Error::invalid_body(format!(
            "request body is not valid JSON for this endpoint: {e}"
        ))
    })?;
    let model = match probe.model {
        Some(Name(m)) if !m.is_empty() => m,
        _ => return Err(Error::invalid_body("request body has no \"model\"")),
    };
    let Some(route) = snap.config.route_for(&model) else {
        return Err(Error::unknown_model(format!(
            "the model `{}` does not exist or is not routed by this gateway",
            truncate(&model, 256)
        )));
    };
    let provider = snap
        .providers
        .get(route.provider)
        .cloned()
        .ok_or_else(|| Error::internal("route points at a missing provider"))?;
    if Some(provider.kind) != ep.provider_kind() {
        let right = match provider.kind {
            ProviderKind::OpenAi => "/v1/chat/completions",
            ProviderKind::Anthropic => "/v1/messages",
        };
        return Err(Error::bad_request(format!(
            "the model `{}` is served by provider {} ({} API); send it to {right}",
            truncate(&model, 256),
            provider.name,
            provider.kind
        )));
    }
    let mut upstream_body = match &route.upstream_model {
        Some(um) if um.as_str() != model.as_ref() => rename_model(body, &model, um)?,
        _ => body.clone(),
    };
    // An OpenAI stream carries usage only when asked (`stream_options.include_usage`): ask for it on the
    // client's behalf, and remember to hand the client exactly the stream it asked for.
    let stream = probe.stream.unwrap_or(false);
    let client_asked = probe.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true);
    let strip_usage = provider.kind == ProviderKind::OpenAi && stream && !client_asked;
    if strip_usage {
        upstream_body = request_usage(&upstream_body, probe.stream_options.is_some())?;
    }
    Ok(Routed {
        strip_usage,
        max_tokens: probe.max_tokens.max(probe.max_completion_tokens),
        default_max_tokens: route.default_max_tokens,
        model: model.into_owned(),
        stream,
        provider,
        route: route.pattern.as_str().to_owned(),
        upstream_model: route.upstream_model.clone(),
        body: upstream_body,
    })
}

/// Replaces the top-level `model` value with `new`. When the client's name borrowed straight from the body
/// (no escapes), that is one splice around its byte range; otherwise the body is re-serialised (rare).
#[allow(clippy::ptr_arg)] // Borrowed vs owned is the information this function needs.
fn rename_model(body: &Bytes, model: &Cow<'_, str>, new: &str) -> Result<Bytes> {
    if let Cow::Borrowed(s) = model {
        let start = (s.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
        let end = start + s.len();
        if end <= body.len()
            && start >= 1
            && body.get(start - 1) == Some(&b'"')
            && body.get(end) == Some(&b'"')
        {
            let mut out = BytesMut::with_capacity(body.len() + new.len());
            out.extend_from_slice(&body[..start]);
            out.extend_from_slice(new.as_bytes());
            out.extend_from_slice(&body[end..]);
            return Ok(out.freeze());
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid_body(format!("invalid JSON: {e}")))?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("model".into(), serde_json::Value::String(new.to_owned()));
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|_| Error::internal("could not re-encode the request body"))
}

/// Adds `"stream_options":{"include_usage":true}` to a JSON object body: one splice after the opening brace
/// when the client sent no `stream_options`, a re-encode (rare) when it sent some without `include_usage`.
fn request_usage(body: &Bytes, has_options: bool) -> Result<Bytes> {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
    if !has_options {
        if let Some(out) = insert_member(body, MEMBER) {
            return Ok(out);
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid_body(format!("invalid JSON: {e}")))?;
    if let Some(obj) = v.as_object_mut() {
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        match opts.as_object_mut() {
            Some(o) => {
                o.insert("include_usage".into(), serde_json::Value::Bool(true));
            }
            None => return Err(Error::invalid_body("`stream_options` must be an object")),
        }
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|_| Error::internal("could not re-encode the request body"))
}

/// The body with its top-level `model` replaced by `model` (a budget's downgrade; a re-encode, rare).
pub fn with_model(body: &Bytes, model: &str) -> Result<Bytes> {
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid_body(format!("invalid JSON: {e}")))?;
    match v.as_object_mut() {
        Some(obj) => {
            obj.insert("model".into(), serde_json::Value::String(model.to_owned()));
        }
        None => return Err(Error::invalid_body("request body is not a JSON object")),
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|_| Error::internal("could not re-encode the request body"))
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

/// `GET /v1/models`: the exactly-named routes, in the OpenAI shape or, for Anthropic SDK callers, Anthropic's.
/// `allowed(model, upstream_model, provider)` filters it to what the caller's policies permit.
pub fn models_body(
    snap: &Snapshot,
    shape: ApiShape,
    allowed: &dyn Fn(&str, Option<&str>, &str) -> bool,
) -> Vec<u8> {
    let names: Vec<(&str, &str)> = snap
        .config
        .routes
        .iter()
        .filter(|r| !r.pattern.is_glob())
        .filter(|r| {
            let provider = snap
                .providers
                .get(r.provider)
                .map(|p| p.name.as_str())
                .unwrap_or("");
            allowed(r.pattern.as_str(), r.upstream_model.as_deref(), provider)
        })
        .map(|r| {
            (
                r.pattern.as_str(),
                snap.providers
                    .get(r.provider)
                    .map(|p| p.name.as_str())
                    .unwrap_or(""),
            )
        })
        .collect();
    let v = match shape {
        ApiShape::OpenAi => serde_json::json!({
            "object": "list",
            "data": names.iter().map(|(id, owner)| serde_json::json!({
                "id": id, "object": "model", "created": 0, "owned_by": owner
            })).collect::<Vec<_>>(),
        }),
        ApiShape::Anthropic => serde_json::json!({
            "data": names.iter().map(|(id, _)| serde_json::json!({
                "type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"
            })).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": names.first().map(|n| n.0),
            "last_id": names.last().map(|n| n.0),
        }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_splices_only_the_name() {
        let body = Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"model"}],"model":"fast","stream":true}"#,
        );
        let probe: Probe<'_> = serde_json::from_slice(&body).unwrap();
        let m = probe.model.unwrap().0;
        assert!(matches!(m, Cow::Borrowed(_)));
        let out = rename_model(&body, &m, "gpt-4o-mini").unwrap();
        assert_eq!(
            &out[..],
            br#"{"messages":[{"role":"user","content":"model"}],"model":"gpt-4o-mini","stream":true}"#
        );
    }

    #[test]
    fn usage_is_requested_with_one_splice() {
        let body = Bytes::from_static(br#" {"model":"m","stream":true}"#);
        let out = request_usage(&body, false).unwrap();
        assert_eq!(
            &out[..],
            br#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#,
        );
        let v: serde_json::Value =
            serde_json::from_slice(&request_usage(&body, true).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let bad = Bytes::from_static(br#"{"model":"m","stream_options":3}"#);
        assert_eq!(request_usage(&bad, true).unwrap_err().status(), 400);
    }

    #[test]
    fn rename_with_escapes_reencodes() {
        let body = Bytes::from_static(br#"{"model":"fa\u0073t","x":1}"#);
        let probe: Probe<'_> = serde_json::from_slice(&body).unwrap();
        let m = probe.model.unwrap().0;
        assert!(matches!(m, Cow::Owned(_)));
        let out = rename_model(&body, &m, "real").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "real");
        assert_eq!(v["x"], 1);
    }
}
