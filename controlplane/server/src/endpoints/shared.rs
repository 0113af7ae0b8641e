//! What the admin API's handlers share: store calls off the runtime, names in paths, `If-Match` and
//! `ETag`, `Idempotency-Key` digests, cursors, the object view, and writes through the catalog with the
//! gateway's validator (calling the change hook when applied). Fails: with `ApiError` only. Cost: a
//! write reads and validates the configuration file once.

use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tollgate_core::catalog::effective::Validator;
use tollgate_core::catalog::{
    self, AnswerFn, Change, Idempotency, Kind, Object, Snapshot, WriteRequest, Written,
};
use utoipa::{IntoParams, ToSchema};

use crate::callers::Caller;
use crate::problem::ApiError;
use crate::App;

/// Shared state as handlers extract it.
pub type AppState = axum::extract::State<Arc<App>>;

/// Runs a blocking store call on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::StoreUnavailable(format!("a store call did not finish: {e}")))?
}

/// Names in paths and bodies: 1-128 characters of `A-Z a-z 0-9 . _ -`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A name from a path: an impossible one is simply not found.
pub fn path_name(kind: Kind, n: &str) -> Result<(), ApiError> {
    if valid_name(n) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "no {kind} by that name (names are 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-')"
        )))
    }
}

/// The `ETag` of an object at `version`.
pub fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// The version an `If-Match` names: required on updates and deletes.
pub fn if_match(headers: &HeaderMap) -> Result<catalog::Precondition, ApiError> {
    let v = headers.get(header::IF_MATCH).ok_or_else(|| {
        ApiError::PreconditionRequired(
            "send If-Match with the object's ETag (from a GET) so a concurrent change is not lost"
                .to_owned(),
        )
    })?;
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(catalog::Precondition::Exists);
    }
    let s = s.strip_prefix("W/").unwrap_or(s);
    match s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .and_then(|n| n.parse::<u64>().ok())
    {
        Some(n) => Ok(catalog::Precondition::Version(n)),
        None => Err(ApiError::PreconditionFailed(
            "If-Match does not name a version of this object (expected an ETag such as \"12\")"
                .to_owned(),
        )),
    }
}

/// A create's `Idempotency-Key` with the digest of its request (SHA-256 of method, path and body).
pub fn idempotency(
    headers: &HeaderMap,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Result<Option<Idempotency>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 255 || !b.iter().all(|c| (0x20..=0x7e).contains(c)) {
        return Err(ApiError::InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters".to_owned(),
        ));
    }
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(body);
    let digest = h
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Ok(Some(Idempotency {
        key: String::from_utf8_lossy(b).into_owned(),
        digest,
    }))
}

/// The header a replayed answer carries.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The configuration file's validator, read now (so an edited file is seen).
pub fn validator(app: &App) -> Result<Validator, ApiError> {
    Validator::new(&app.config_path).map_err(|e| {
        ApiError::ConfigUnavailable(format!("the gateway's configuration cannot be read: {e}"))
    })
}

/// The catalog as of now.
pub fn snapshot(app: &App) -> Result<Snapshot, ApiError> {
    catalog::read(app.store.as_ref()).map_err(|e| ApiError::StoreUnavailable(e.to_string()))
}

/// One write through the catalog with the gateway's validator; calls the change hook when applied.
/// `prefix` maps a validation issue's object to where its fields sit in the request body.
pub fn write(
    app: &App,
    caller: &Caller,
    action: &str,
    changes: Vec<Change>,
    idem: Option<&Idempotency>,
    answer: &AnswerFn,
    prefix: &dyn Fn(Kind, &str) -> String,
) -> Result<Written, ApiError> {
    let v = validator(app)?;
    let actor = caller.actor();
    let out = catalog::write(
        app.store.as_ref(),
        &WriteRequest {
            changes,
            actor: &actor,
            action,
            idempotency: idem,
            answer,
            validate: &|snap| v.config(snap).map(|_| ()),
            file_owned: &|k, n| v.file_owned(k, n),
        },
    )
    .map_err(|e| crate::problem::from_catalog(e, prefix))?;
    if let Written::Applied { version, .. } = &out {
        app.hooks.changed(*version);
    }
    Ok(out)
}

/// A stored answer replayed: its status and body, marked.
pub fn replayed(
    status: u16,
    body: serde_json::Value,
    extra: &[(HeaderName, HeaderValue)],
) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut r = (status, axum::Json(body)).into_response();
    r.headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    for (k, v) in extra {
        r.headers_mut().insert(k.clone(), v.clone());
    }
    r
}

/// `?limit=&cursor=` of a listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// At most this many items (1-1000, default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageQuery {
    pub fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(100),
            Some(n @ 1..=1000) => Ok(n as usize),
            Some(n) => Err(ApiError::InvalidRequest(format!(
                "limit must be between 1 and 1000, not {n}"
            ))),
        }
    }
}

/// A listing's page size and the position it starts after (the decoded cursor), or a problem naming the
/// bad parameter: what every paginated list reads first.
pub fn page(
    q: Result<axum::extract::Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(usize, Option<String>), ApiError> {
    let q = page_query(q)?;
    let limit = q.limit()?;
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    Ok((limit, after))
}

/// The query of a listing, or a problem naming what is wrong with it.
pub fn page_query(
    q: Result<axum::extract::Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<PageQuery, ApiError> {
    q.map(|q| q.0)
        .map_err(|e| ApiError::InvalidRequest(format!("the query is not valid: {}", e.body_text())))
}

/// An opaque cursor: hex of the last item's position.
pub fn encode_cursor(pos: &str) -> String {
    pos.bytes().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_cursor(c: &str) -> Result<String, ApiError> {
    let bad = || ApiError::InvalidRequest("cursor is not one this API gave out".to_owned());
    if c.len() & 1 == 1 || c.len() > 1024 {
        return Err(bad());
    }
    let bytes = (0..c.len())
        .step_by(2)
        .map(|i| c.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// An object as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ObjectView {
    /// `policy`, `budget` or `price_override`.
    pub kind: String,
    pub name: String,
    /// `file`: defined in the configuration file (read-only here); `api`: made through this API.
    pub owner: String,
    /// The catalog version that last wrote it (its ETag); absent for the file's objects.
    pub version: Option<u64>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    /// `token:NAME`, `user:SUBJECT` or `cli`.
    pub updated_by: Option<String>,
    /// As the configuration file would write it.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
}

impl ObjectView {
    pub fn api(o: &Object) -> ObjectView {
        ObjectView {
            kind: o.kind.as_str().to_owned(),
            name: o.name.clone(),
            owner: "api".to_owned(),
            version: Some(o.version),
            created_at: Some(o.created_at.to_string()),
            updated_at: Some(o.updated_at.to_string()),
            updated_by: Some(o.updated_by.clone()),
            spec: o.spec.clone(),
        }
    }

    pub fn file(kind: Kind, name: &str, spec: serde_json::Value) -> ObjectView {
        ObjectView {
            kind: kind.as_str().to_owned(),
            name: name.to_owned(),
            owner: "file".to_owned(),
            version: None,
            created_at: None,
            updated_at: None,
            updated_by: None,
            spec,
        }
    }
}

/// One page of objects.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ObjectPage {
    pub items: Vec<ObjectView>,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}
