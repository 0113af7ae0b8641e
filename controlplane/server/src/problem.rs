//! Errors as RFC 9457 problem details: the one error type every handler returns ([`ApiError`]), its one
//! mapping to an HTTP status and a problem `type`, and [`problemize`], the layer that turns any other error
//! response (axum's own rejections: unknown path, wrong method, a body over the limit, a bad path or
//! query) into the same `application/problem+json` shape, so a client reads one error format.
//!
//! Owns: [`ApiError`], [`Problem`] (the wire shape, also the OpenAPI schema), [`from_catalog`] (the
//! catalog's errors), [`parse_json`] (a JSON body read strictly, its serde error naming the field). Fails:
//! never (this is the failure path). Secrets: details are built from the server's own messages; a
//! presented credential is never put in one. Cost: one small JSON body per error.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tollgate_core::catalog::{CatalogError, FieldIssue, Kind};
use utoipa::ToSchema;

/// The problem `type` URIs' prefix; the code follows.
pub const PROBLEM_BASE: &str = "https://tollgate.dev/problems/";

/// The largest request body the API reads (64 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An RFC 9457 problem details body.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// `https://tollgate.dev/problems/<code>`, or `about:blank`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Per-field problems of a request body (validation and body errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// One field's problem.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct FieldError {
    /// Dotted path inside the request body (`amount_usd`, `budget.window`); empty for the whole body.
    pub field: String,
    pub reason: String,
}

/// Everything a handler can fail with. [`ApiError::status`] is the one status mapping.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// A body that is not the JSON the endpoint reads (syntax, a wrong type, an unknown field).
    #[error("{detail}")]
    InvalidBody {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// A malformed header, query or cursor.
    #[error("{0}")]
    InvalidRequest(String),
    /// The catalog's validator (the file plus every object) refused the change; or a name in the path.
    #[error("{detail}")]
    Validation {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    OwnedByFile(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    PreconditionRequired(String),
    #[error("the Idempotency-Key was used before for a different request")]
    IdempotencyKeyReused,
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("the request body is over the {MAX_BODY_BYTES}-byte limit")]
    PayloadTooLarge,
    /// The store cannot be reached or read.
    #[error("{0}")]
    StoreUnavailable(String),
    /// The gateway's configuration file cannot be read or does not validate on its own.
    #[error("{0}")]
    ConfigUnavailable(String),
    /// A status this API does not otherwise produce (an axum rejection), kept as is.
    #[error("{1}")]
    Other(StatusCode, String),
}

impl ApiError {
    /// The one mapping to an HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidBody { .. } | ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Validation { .. } | ApiError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Exists(_) | ApiError::OwnedByFile(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PreconditionRequired(_) => StatusCode::PRECONDITION_REQUIRED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::StoreUnavailable(_) | ApiError::ConfigUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Other(s, _) => *s,
        }
    }

    /// The problem code (the last segment of `type`).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidBody { .. } => "invalid_body",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::Validation { .. } => "validation_failed",
            ApiError::NotFound(_) => "not_found",
            ApiError::Exists(_) => "exists",
            ApiError::OwnedByFile(_) => "owned_by_file",
            ApiError::PreconditionFailed(_) => "precondition_failed",
            ApiError::PreconditionRequired(_) => "precondition_required",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::ConfigUnavailable(_) => "config_unavailable",
            ApiError::Other(..) => "error",
        }
    }

    pub fn problem(&self) -> Problem {
        let status = self.status();
        let errors = match self {
            ApiError::InvalidBody { errors, .. } | ApiError::Validation { errors, .. } => {
                Some(errors.clone())
            }
            _ => None,
        };
        Problem {
            kind: match self {
                ApiError::Other(..) => "about:blank".to_owned(),
                _ => format!("{PROBLEM_BASE}{}", self.code()),
            },
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            errors,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem_response(&self.problem(), self.status())
    }
}

/// A problem as a response (with `WWW-Authenticate: Bearer` on a 401).
pub fn problem_response(p: &Problem, status: StatusCode) -> Response {
    let body = serde_json::to_vec(p).unwrap_or_default();
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tollgate-admin\""),
        );
    }
    r
}

/// The catalog's errors, each to its problem. `prefix` maps an object's fields into the request body
/// (a token's attached budget is `budget.*` there).
pub fn from_catalog(e: CatalogError, prefix: &dyn Fn(Kind, &str) -> String) -> ApiError {
    match e {
        CatalogError::NotFound { .. } => ApiError::NotFound(e.to_string()),
        CatalogError::Exists { .. } => ApiError::Exists(e.to_string()),
        CatalogError::OwnedByFile { .. } => ApiError::OwnedByFile(e.to_string()),
        CatalogError::VersionMismatch { .. } => ApiError::PreconditionFailed(e.to_string()),
        CatalogError::IdempotencyMismatch => ApiError::IdempotencyKeyReused,
        CatalogError::Invalid {
            kind,
            ref name,
            ref issues,
        } => {
            let p = prefix(kind, name);
            ApiError::Validation {
                detail: if name.is_empty() {
                    "the configuration does not validate".to_owned()
                } else {
                    format!("{kind} {name:?} does not validate")
                },
                errors: issues
                    .iter()
                    .map(|i: &FieldIssue| FieldError {
                        field: match (p.is_empty(), i.field.is_empty()) {
                            (true, _) => i.field.clone(),
                            (false, true) => p.clone(),
                            (false, false) => format!("{p}.{}", i.field),
                        },
                        reason: i.reason.clone(),
                    })
                    .collect(),
            }
        }
        CatalogError::Store(s) => ApiError::StoreUnavailable(s.to_string()),
    }
}

/// The request body's bytes (at most [`MAX_BODY_BYTES`]).
pub fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::InvalidRequest(format!("the request body could not be read: {r}"))
        }
    })
}

/// A request body read strictly as `T`; a serde error names the field it is about.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        let mut field = if path == "." { String::new() } else { path };
        // An unknown field is reported at its parent: name the field itself.
        if let Some(rest) = msg.strip_prefix("unknown field `") {
            if let Some(name) = rest.split('`').next() {
                field = join_field(&field, name);
            }
        }
        // Missing fields are named in the message, also at the parent.
        if let Some(rest) = msg.strip_prefix("missing field `") {
            if let Some(name) = rest.split('`').next() {
                field = join_field(&field, name);
            }
        }
        let reason = match msg.rfind(" at line ") {
            Some(i) if inner.is_data() => msg[..i].to_owned(),
            _ => msg.clone(),
        };
        ApiError::InvalidBody {
            detail: if field.is_empty() {
                format!("the body is not valid: {reason}")
            } else {
                format!("the body's field {field:?} is not valid: {reason}")
            },
            errors: vec![FieldError { field, reason }],
        }
    })?;
    Ok(v)
}

/// `parent.name`, unless the path already ends with the name.
fn join_field(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else if parent == name || parent.ends_with(&format!(".{name}")) {
        parent.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// The layer that turns an error response without a problem body (axum's rejections) into one.
pub async fn problemize(resp: Response) -> Response {
    let status = resp.status();
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let err = match status {
        StatusCode::NOT_FOUND => ApiError::NotFound("no such resource".to_owned()),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed(
            "this resource does not accept that method (see the Allow header)".to_owned(),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        s if s.is_client_error() => ApiError::InvalidRequest(if text.is_empty() {
            s.canonical_reason().unwrap_or("bad request").to_owned()
        } else {
            text
        }),
        s => ApiError::Other(s, s.canonical_reason().unwrap_or("error").to_owned()),
    };
    let mut p = err.problem();
    // A 4xx rejection other than these keeps its own status.
    p.status = status.as_u16();
    p.title = status.canonical_reason().unwrap_or("Error").to_owned();
    let mut out = problem_response(&p, status);
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}
