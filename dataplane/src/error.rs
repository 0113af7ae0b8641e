//! The data plane's one error type and its single mapping to an HTTP status and a JSON body.
//!
//! Owns: [`Error`] (what went wrong, which side caused it), its status and its code. The body a client gets
//! is in its API's shape, rendered by [`crate::providers::Api::error_body`]. Fails: never; rendering an
//! error cannot itself fail.
//! Cost: only on error paths; a body is a few hundred bytes formatted with `serde_json`.

use std::borrow::Cow;

/// What went wrong. Kept small: each kind has one status (and, per API, one error `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed request line, headers or body framing; also request smuggling ambiguities.
    BadRequest,
    /// The body is not valid JSON or lacks a required field.
    InvalidBody,
    /// Request head larger than the limit, or too many headers (431).
    HeadTooLarge,
    /// Body larger than the configured maximum (413).
    BodyTooLarge,
    /// The client was too slow sending its request (408).
    ClientTimeout,
    /// No such path (404).
    NotFound,
    /// Path exists, method does not (405).
    MethodNotAllowed,
    /// No route matches the requested model (404, like the providers).
    UnknownModel,
    /// No credential, or one that does not verify (401).
    Unauthenticated,
    /// The caller's policy does not allow this request (403).
    PolicyDenied,
    /// A budget that applies cannot cover the request (429).
    BudgetExceeded,
    /// A budget's owning core could not be asked (503): the request is refused rather than unbudgeted.
    BudgetUnavailable,
    /// The request asks for something whose cost the gateway cannot bound before forwarding (400): audio,
    /// server tools, an unpriced tier. Refused, never forwarded unpriced.
    UnboundedCost,
    /// The model has no price and no fallback price is configured (403): never served for free.
    Unpriced,
    /// The Transfer-Encoding or Expect asked for is not supported (501 / 417 folded into 400 family).
    Unsupported,
    /// The upstream could not be reached: DNS, connect or TLS failed (502).
    UpstreamUnreachable,
    /// The upstream sent something that is not HTTP/1.1 we can forward (502).
    UpstreamProtocol,
    /// The upstream did not answer in time (504).
    UpstreamTimeout,
    /// The gateway is shutting down (503).
    ShuttingDown,
    /// A bug or resource exhaustion inside the gateway (500).
    Internal,
}

/// Which side caused an error; logged with every failure so operators know whom to chase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Gateway,
}

/// A data-plane error: a kind plus a message safe to show the client (it never contains a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: Cow<'static, str>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// The one mapping from error kind to HTTP status.
    pub fn status(&self) -> u16 {
        match self.kind {
            ErrorKind::BadRequest | ErrorKind::InvalidBody | ErrorKind::UnboundedCost => 400,
            ErrorKind::NotFound | ErrorKind::UnknownModel => 404,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Unpriced | ErrorKind::PolicyDenied => 403,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::ClientTimeout => 408,
            ErrorKind::BodyTooLarge => 413,
            ErrorKind::HeadTooLarge => 431,
            ErrorKind::BudgetExceeded => 429,
            ErrorKind::Internal => 500,
            ErrorKind::Unsupported => 501,
            ErrorKind::UpstreamUnreachable | ErrorKind::UpstreamProtocol => 502,
            ErrorKind::ShuttingDown | ErrorKind::BudgetUnavailable => 503,
            ErrorKind::UpstreamTimeout => 504,
        }
    }

    pub fn side(&self) -> Side {
        match self.kind {
            ErrorKind::UpstreamUnreachable
            | ErrorKind::UpstreamProtocol
            | ErrorKind::UpstreamTimeout => Side::Upstream,
            ErrorKind::ShuttingDown | ErrorKind::Internal | ErrorKind::BudgetUnavailable => {
                Side::Gateway
            }
            _ => Side::Client,
        }
    }

    /// A short machine-readable code for logs and the OpenAI `code` field.
    pub fn code(&self) -> &'static str {
        match self.kind {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::InvalidBody => "invalid_body",
            ErrorKind::HeadTooLarge => "head_too_large",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::ClientTimeout => "client_timeout",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::UnknownModel => "model_not_found",
            ErrorKind::Unpriced => "model_unpriced",
            ErrorKind::UnboundedCost => "cost_unbounded",
            ErrorKind::Unauthenticated => "invalid_api_key",
            ErrorKind::PolicyDenied => "policy_denied",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::BudgetUnavailable => "budget_unavailable",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::UpstreamUnreachable => "upstream_unreachable",
            ErrorKind::UpstreamProtocol => "upstream_protocol_error",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::Internal => "internal_error",
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code(), self.status(), self.message)
    }
}

impl std::error::Error for Error {}

/// Shorthand constructors, one per kind, so call sites read as the failure they report.
macro_rules! ctor {
    ($($name:ident => $kind:ident),* $(,)?) => {
        impl Error {
            $(pub fn $name(message: impl Into<Cow<'static, str>>) -> Self { Error::new(ErrorKind::$kind, message) })*
        }
    };
}

ctor! {
    bad_request => BadRequest,
    invalid_body => InvalidBody,
    head_too_large => HeadTooLarge,
    body_too_large => BodyTooLarge,
    client_timeout => ClientTimeout,
    not_found => NotFound,
    method_not_allowed => MethodNotAllowed,
    unknown_model => UnknownModel,
    unpriced => Unpriced,
    unbounded_cost => UnboundedCost,
    unauthenticated => Unauthenticated,
    policy_denied => PolicyDenied,
    budget_exceeded => BudgetExceeded,
    budget_unavailable => BudgetUnavailable,
    unsupported => Unsupported,
    upstream_unreachable => UpstreamUnreachable,
    upstream_protocol => UpstreamProtocol,
    upstream_timeout => UpstreamTimeout,
    shutting_down => ShuttingDown,
    internal => Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(Error::head_too_large("").status(), 431);
        assert_eq!(Error::body_too_large("").status(), 413);
        assert_eq!(Error::upstream_unreachable("").status(), 502);
        assert_eq!(Error::upstream_timeout("").status(), 504);
        assert_eq!(Error::upstream_timeout("").side(), Side::Upstream);
    }
}
