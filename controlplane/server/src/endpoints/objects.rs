//! The versioned objects the catalog holds beside the file (policies, budgets, price overrides): one
//! generic implementation of list, create, get, replace and delete, and `object_routes!`, which gives a
//! resource file its five documented handlers.
//!
//! Owns: [`Spec`] (which raw configuration type a kind's body is, and where its name sits). Creates and
//! updates read the body strictly as the file's own raw type (unknown fields refused, naming them), then
//! write through the catalog with the gateway's validator (422 naming the field), the file's names being
//! read-only (409 `owned_by_file`); updates and deletes need `If-Match` (428 without, 412 when stale).
//! Fails: [`ApiError`]. Cost: a read is one catalog range read plus, for the file's objects, one TOML
//! parse; a write reads and validates the whole configuration once.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tollgate_core::auth::identity::RawPolicy;
use tollgate_core::budget::RawBudget;
use tollgate_core::catalog::{Change, Kind, Object, Precondition, Written};
use tollgate_core::pricing::RawOverride;

use super::shared::{
    blocking, encode_cursor, etag, idempotency, if_match, page, path_name, replayed, snapshot,
    valid_name, validator, write, ObjectPage, ObjectView, PageQuery,
};
use crate::callers::Caller;
use crate::problem::{parse_json, read_body, ApiError, FieldError};
use crate::App;

/// A kind whose objects are a raw configuration entry.
pub trait Spec: DeserializeOwned + Serialize + Send + 'static {
    const KIND: Kind;
    /// The collection's path (`/admin/v1/policies`).
    const BASE: &'static str;
    fn name(&self) -> Option<&str>;
}

impl Spec for RawPolicy {
    const KIND: Kind = Kind::Policy;
    const BASE: &'static str = "/admin/v1/policies";
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }
}

impl Spec for RawBudget {
    const KIND: Kind = Kind::Budget;
    const BASE: &'static str = "/admin/v1/budgets";
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }
}

impl Spec for RawOverride {
    const KIND: Kind = Kind::PriceOverride;
    const BASE: &'static str = "/admin/v1/price-overrides";
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

/// The body as `S`, its name checked (and equal to `path_name` on a replace), and as stored.
fn body_spec<S: Spec>(
    bytes: &[u8],
    path_name: Option<&str>,
) -> Result<(String, serde_json::Value), ApiError> {
    let spec: S = parse_json(bytes)?;
    let invalid = |reason: String| ApiError::Validation {
        detail: format!("the {}'s name is not valid", S::KIND),
        errors: vec![FieldError {
            field: "name".to_owned(),
            reason,
        }],
    };
    let name = match (spec.name(), path_name) {
        (None, _) => return Err(invalid("is required".to_owned())),
        (Some(n), _) if !valid_name(n) => {
            return Err(invalid(
                "must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-'".to_owned(),
            ))
        }
        (Some(n), Some(p)) if n != p => {
            return Err(invalid(format!("is {n:?}, but the path names {p:?}")))
        }
        (Some(n), _) => n.to_owned(),
    };
    let value = serde_json::to_value(&spec).map_err(|e| ApiError::InvalidBody {
        detail: e.to_string(),
        errors: Vec::new(),
    })?;
    Ok((name, value))
}

fn with_tags(mut r: Response, o: &ObjectView, status: StatusCode, base: &str) -> Response {
    *r.status_mut() = status;
    if let Some(v) = o.version {
        r.headers_mut().insert(header::ETAG, etag(v));
    }
    if status == StatusCode::CREATED {
        if let Ok(l) = HeaderValue::from_str(&format!("{base}/{}", o.name)) {
            r.headers_mut().insert(header::LOCATION, l);
        }
    }
    r
}

fn written_object(w: &Written) -> Option<Object> {
    match w {
        Written::Applied { objects, .. } => objects.first().cloned().flatten(),
        Written::Replayed(_) => None,
    }
}

pub async fn list<S: Spec>(
    State(app): State<Arc<App>>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<ObjectPage>, ApiError> {
    let (limit, after) = page(q)?;
    let page = blocking(move || {
        let v = validator(&app)?;
        let snap = snapshot(&app)?;
        // Position keys: the file's objects first ("f"), then the API's ("a"), each in name order.
        let mut all: Vec<(String, ObjectView)> = Vec::new();
        for n in v.file_names(S::KIND) {
            let spec = v.file_spec(S::KIND, &n).unwrap_or(serde_json::Value::Null);
            all.push((format!("0f:{n}"), ObjectView::file(S::KIND, &n, spec)));
        }
        for o in snap.of(S::KIND) {
            all.push((format!("1a:{}", o.name), ObjectView::api(o)));
        }
        let items: Vec<(String, ObjectView)> = all
            .into_iter()
            .filter(|(pos, _)| after.as_ref().is_none_or(|a| pos > a))
            .take(limit + 1)
            .collect();
        let more = items.len() > limit;
        let items: Vec<(String, ObjectView)> = items.into_iter().take(limit).collect();
        let next_cursor = if more {
            items.last().map(|(p, _)| encode_cursor(p))
        } else {
            None
        };
        Ok(ObjectPage {
            items: items.into_iter().map(|(_, o)| o).collect(),
            next_cursor,
        })
    })
    .await?;
    Ok(Json(page))
}

pub async fn create<S: Spec>(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = read_body(body)?;
    let idem = idempotency(&headers, &Method::POST, uri.path(), &bytes)?;
    let (name, spec) = body_spec::<S>(&bytes, None)?;
    let w = blocking(move || {
        write(
            &app,
            &caller,
            "create",
            vec![Change {
                kind: S::KIND,
                name,
                spec: Some(spec),
                precondition: Precondition::Absent,
            }],
            idem.as_ref(),
            &|objs| {
                let body = objs
                    .first()
                    .cloned()
                    .flatten()
                    .map(|o| serde_json::to_value(ObjectView::api(&o)).unwrap_or_default())
                    .unwrap_or_default();
                (201, body)
            },
            &|_, _| String::new(),
        )
    })
    .await?;
    match (&w, written_object(&w)) {
        (Written::Replayed(a), _) => {
            let mut extra = Vec::new();
            if let Ok(o) = serde_json::from_value::<ObjectView>(a.body.clone()) {
                if let Some(v) = o.version {
                    extra.push((header::ETAG, etag(v)));
                }
                if let Ok(l) = HeaderValue::from_str(&format!("{}/{}", S::BASE, o.name)) {
                    extra.push((header::LOCATION, l));
                }
            }
            Ok(replayed(a.status, a.body.clone(), &extra))
        }
        (_, Some(o)) => {
            let view = ObjectView::api(&o);
            Ok(with_tags(
                Json(&view).into_response(),
                &view,
                StatusCode::CREATED,
                S::BASE,
            ))
        }
        (_, None) => Err(ApiError::StoreUnavailable(
            "the write reported no object".to_owned(),
        )),
    }
}

pub async fn get<S: Spec>(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    path_name(S::KIND, &name)?;
    let view = blocking(move || {
        let snap = snapshot(&app)?;
        if let Some(o) = snap.objects.get(&(S::KIND, name.clone())) {
            return Ok(ObjectView::api(o));
        }
        let v = validator(&app)?;
        match v.file_spec(S::KIND, &name) {
            Some(spec) => Ok(ObjectView::file(S::KIND, &name, spec)),
            None => Err(ApiError::NotFound(format!("no {} named {name:?}", S::KIND))),
        }
    })
    .await?;
    Ok(with_tags(
        Json(&view).into_response(),
        &view,
        StatusCode::OK,
        S::BASE,
    ))
}

pub async fn replace<S: Spec>(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    path_name(S::KIND, &name)?;
    let pre = if_match(&headers)?;
    let bytes = read_body(body)?;
    let (name, spec) = body_spec::<S>(&bytes, Some(&name))?;
    let w = blocking(move || {
        write(
            &app,
            &caller,
            "update",
            vec![Change {
                kind: S::KIND,
                name,
                spec: Some(spec),
                precondition: pre,
            }],
            None,
            &|_| (200, serde_json::Value::Null),
            &|_, _| String::new(),
        )
    })
    .await?;
    let o = written_object(&w)
        .ok_or_else(|| ApiError::StoreUnavailable("the write reported no object".to_owned()))?;
    let view = ObjectView::api(&o);
    Ok(with_tags(
        Json(&view).into_response(),
        &view,
        StatusCode::OK,
        S::BASE,
    ))
}

pub async fn delete<S: Spec>(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    path_name(S::KIND, &name)?;
    let pre = if_match(&headers)?;
    blocking(move || {
        write(
            &app,
            &caller,
            "delete",
            vec![Change {
                kind: S::KIND,
                name,
                spec: None,
                precondition: pre,
            }],
            None,
            &|_| (204, serde_json::Value::Null),
            &|_, _| String::new(),
        )
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The five handlers of a versioned-object resource, documented: `object_routes!(RawPolicy, "/admin/v1/policies", "policies")`.
#[macro_export]
macro_rules! object_routes {
    ($spec:ty, $base:literal, $item:literal, $tag:literal) => {
        use axum::body::Bytes;
        use axum::extract::rejection::{BytesRejection, QueryRejection};
        use axum::extract::{OriginalUri, Path, Query, State};
        use axum::http::HeaderMap;
        use axum::response::Response;
        use axum::{Extension, Json};

        use $crate::callers::Caller;
        use $crate::endpoints::objects;
        use $crate::endpoints::shared::{ObjectPage, PageQuery};
        use $crate::problem::{ApiError, Problem};
        use $crate::App;

        /// Lists the file's objects (`owner: "file"`), then the API's (`owner: "api"`).
        #[utoipa::path(get, path = $base, tag = $tag, params(PageQuery),
            responses((status = 200, description = "One page", body = ObjectPage)),
            security(("bearer" = [])))]
        pub async fn list(
            s: State<std::sync::Arc<App>>,
            q: Result<Query<PageQuery>, QueryRejection>,
        ) -> Result<Json<ObjectPage>, ApiError> {
            objects::list::<$spec>(s, q).await
        }

        /// Creates an object (`Idempotency-Key` honoured).
        #[utoipa::path(post, path = $base, tag = $tag, request_body = $spec,
            params(("Idempotency-Key" = Option<String>, Header, description = "1-255 printable ASCII characters; a repeat gets the first answer")),
            responses(
                (status = 201, description = "Created; ETag and Location set", body = $crate::endpoints::shared::ObjectView,
                    headers(("ETag" = String), ("Location" = String))),
                (status = 409, description = "Exists, or the file owns the name", body = Problem, content_type = "application/problem+json"),
                (status = 422, description = "Validation failed, or the Idempotency-Key was used for another request", body = Problem, content_type = "application/problem+json")),
            security(("bearer" = [])))]
        pub async fn create(
            s: State<std::sync::Arc<App>>,
            c: Extension<Caller>,
            u: OriginalUri,
            h: HeaderMap,
            b: Result<Bytes, BytesRejection>,
        ) -> Result<Response, ApiError> {
            objects::create::<$spec>(s, c, u, h, b).await
        }

        /// Reads one object (with its ETag when the API owns it).
        #[utoipa::path(get, path = $item, tag = $tag, params(("name" = String, Path)),
            responses(
                (status = 200, description = "The object", body = $crate::endpoints::shared::ObjectView, headers(("ETag" = String))),
                (status = 404, description = "No such object", body = Problem, content_type = "application/problem+json")),
            security(("bearer" = [])))]
        pub async fn get(s: State<std::sync::Arc<App>>, n: Path<String>) -> Result<Response, ApiError> {
            objects::get::<$spec>(s, n).await
        }

        /// Replaces an object; `If-Match` required.
        #[utoipa::path(put, path = $item, tag = $tag, request_body = $spec,
            params(("name" = String, Path), ("If-Match" = String, Header, description = "The object's ETag")),
            responses(
                (status = 200, description = "Replaced", body = $crate::endpoints::shared::ObjectView, headers(("ETag" = String))),
                (status = 404, description = "No such object", body = Problem, content_type = "application/problem+json"),
                (status = 409, description = "The file owns the name", body = Problem, content_type = "application/problem+json"),
                (status = 412, description = "The object changed since that ETag", body = Problem, content_type = "application/problem+json"),
                (status = 422, description = "Validation failed", body = Problem, content_type = "application/problem+json"),
                (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json")),
            security(("bearer" = [])))]
        pub async fn replace(
            s: State<std::sync::Arc<App>>,
            c: Extension<Caller>,
            n: Path<String>,
            h: HeaderMap,
            b: Result<Bytes, BytesRejection>,
        ) -> Result<Response, ApiError> {
            objects::replace::<$spec>(s, c, n, h, b).await
        }

        /// Deletes an object; `If-Match` required.
        #[utoipa::path(delete, path = $item, tag = $tag,
            params(("name" = String, Path), ("If-Match" = String, Header, description = "The object's ETag")),
            responses(
                (status = 204, description = "Deleted"),
                (status = 404, description = "No such object", body = Problem, content_type = "application/problem+json"),
                (status = 409, description = "The file owns the name", body = Problem, content_type = "application/problem+json"),
                (status = 412, description = "The object changed since that ETag", body = Problem, content_type = "application/problem+json"),
                (status = 422, description = "The configuration would not validate without it", body = Problem, content_type = "application/problem+json"),
                (status = 428, description = "If-Match missing", body = Problem, content_type = "application/problem+json")),
            security(("bearer" = [])))]
        pub async fn delete(
            s: State<std::sync::Arc<App>>,
            c: Extension<Caller>,
            n: Path<String>,
            h: HeaderMap,
        ) -> Result<Response, ApiError> {
            objects::delete::<$spec>(s, c, n, h).await
        }

        /// The resource's routes.
        pub fn object_router() -> axum::Router<std::sync::Arc<App>> {
            axum::Router::new()
                .route($base, axum::routing::get(list).post(create))
                .route($item, axum::routing::get(get).put(replace).delete(delete))
        }
    };
}
