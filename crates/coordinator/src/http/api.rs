//! The HTTP API: routes, authentication, the edge's bounds on requests, and the small
//! endpoints.
//!
//! Every request's body is read whole within `http_body_read_timeout` and within its
//! route's size limit (`max_file_bytes` for uploads, `max_body_bytes` elsewhere), before any
//! handler runs ([`read_body`]): a slow or oversized body costs a connection for a bounded
//! time only. Handlers other than generation answer within `http_request_timeout`; a
//! generation's answer takes as long as its job and a stream is never cut.
//!
//! Operator endpoints take `Authorization: Bearer <operator_key>`: `/metrics` (whose queue
//! depths and verification counters would tell a liar when to lie) and `/healthz` with
//! details. `/livez`, and `/healthz` without the key, answer only that the process serves.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::batch::runner::BatchRunner;
use axum::{Json, Router};

use crate::clock::unix_ms;
use crate::config::CoordinatorConfig;
use crate::domain::error::{ErrorKind, RequestError};
use crate::domain::store::Store;
use crate::fleet::manager::Manager;
use crate::metrics::Metrics;
use crate::openai::wire::{ModelList, ModelObject};

pub struct AppState {
    pub manager: Manager,
    pub batches: BatchRunner,
    pub store: Store,
    pub config: Arc<CoordinatorConfig>,
    pub metrics: Arc<Metrics>,
    /// API key → tenant.
    pub keys: HashMap<String, String>,
    /// Per-tenant residency and rate limits.
    pub tenants: Arc<crate::policy::tenants::Tenants>,
    /// Residency regions, to refuse requests naming a region that does not exist.
    pub regions: Arc<crate::policy::regions::RegionMap>,
    /// Prompt token counts with the trusted models (empty when verification is off).
    pub prompts: crate::trust::verify::PromptCounter,
}

pub type Shared = Arc<AppState>;

/// Routes whose handler follows a job: their answer takes as long as the job, so only the
/// request's body read is timed, not the handler.
const GENERATION: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

pub fn router(state: Shared) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route(
            "/v1/chat/completions",
            post(crate::http::generate::chat_completions),
        )
        .route("/v1/completions", post(crate::http::generate::completions))
        .route("/v1/models", get(models))
        .route(
            "/v1/files",
            post(crate::http::files::upload)
                .get(crate::http::files::list)
                .layer(DefaultBodyLimit::max(upload_limit(&state.config))),
        )
        .route(
            "/v1/files/{id}",
            get(crate::http::files::retrieve).delete(crate::http::files::delete),
        )
        .route("/v1/files/{id}/content", get(crate::http::files::content))
        .route(
            "/v1/batches",
            post(crate::http::batches::create).get(crate::http::batches::list),
        )
        .route("/v1/batches/{id}", get(crate::http::batches::retrieve))
        .route(
            "/v1/batches/{id}/cancel",
            post(crate::http::batches::cancel),
        )
        .route("/livez", get(livez))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            read_body,
        ))
        .with_state(state)
}

/// The largest body `POST /v1/files` takes: the file limit plus room for the multipart
/// framing around the file.
fn upload_limit(config: &CoordinatorConfig) -> usize {
    config.max_file_bytes.saturating_add(64 << 10)
}

/// Reads the whole request body within `http_body_read_timeout` and the route's size limit,
/// then runs the handler (within `http_request_timeout`, except generation).
async fn read_body(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let config = &state.config;
    let path = request.uri().path().to_string();
    let limit = if path == "/v1/files" {
        upload_limit(config)
    } else {
        config.max_body_bytes
    };
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(
        config.http_body_read_timeout,
        axum::body::to_bytes(body, limit),
    )
    .await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let e = e.into_inner();
            let too_large = e.is::<http_body_util::LengthLimitError>();
            let mut err = if too_large {
                RequestError::invalid("The request body is too large for this fleet.", None)
                    .with_code("request_too_large")
            } else {
                RequestError::invalid(format!("could not read the request body: {e}"), None)
            };
            if too_large {
                err.kind = ErrorKind::PayloadTooLarge;
            }
            return err.into_response();
        }
        Err(_) => {
            let mut err = RequestError::invalid(
                format!(
                    "The request body was not received within {} s.",
                    config.http_body_read_timeout.as_secs()
                ),
                None,
            )
            .with_code("request_timeout");
            err.kind = ErrorKind::RequestTimeout;
            return err.into_response();
        }
    };
    let request = Request::from_parts(parts, axum::body::Body::from(bytes));
    if GENERATION.contains(&path.as_str()) {
        return next.run(request).await;
    }
    match tokio::time::timeout(config.http_request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => RequestError::unavailable(format!(
            "the request was not answered within {} s",
            config.http_request_timeout.as_secs()
        ))
        .into_response(),
    }
}

/// Whether the request carries the operator key (never true without one configured).
fn is_operator(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(op) = state.config.operator_key.as_deref() else {
        return false;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| constant_time_eq(k.trim().as_bytes(), op.as_bytes()))
}

/// Compares without an early exit, so the time taken does not tell how much of a guessed
/// key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The tenant behind the request's bearer key.
pub fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<String, RequestError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            RequestError::unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            )
        })?
        .to_str()
        .map_err(|_| RequestError::unauthorized("The Authorization header is not valid text."))?;
    let key = value
        .strip_prefix("Bearer ")
        .ok_or_else(|| {
            RequestError::unauthorized("The Authorization header must be 'Bearer YOUR_KEY'.")
        })?
        .trim();
    state
        .keys
        .get(key)
        .cloned()
        .ok_or_else(|| RequestError::unauthorized("Incorrect API key provided."))
}

async fn models(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(e) = authenticate(&state, &headers) {
        return e.into_response();
    }
    let created = unix_ms() / 1000;
    let data = state
        .manager
        .models()
        .await
        .into_iter()
        .map(|id| ModelObject {
            id,
            object: "model",
            created,
            owned_by: "tokenfleet".into(),
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

/// Liveness, public: the process serves HTTP. Nothing else.
async fn livez() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

/// Public, the same as `/livez`; with the operator key, also the queue.
async fn healthz(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if !is_operator(&state, &headers) {
        return livez().await;
    }
    let queued = state.manager.queue_len().await;
    Json(serde_json::json!({"status": "ok", "queued_jobs": queued})).into_response()
}

/// Prometheus text, for the operator key only.
async fn metrics(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if !is_operator(&state, &headers) {
        let message = if state.config.operator_key.is_some() {
            "/metrics takes the operator key: 'Authorization: Bearer OPERATOR_KEY'."
        } else {
            "/metrics is off: no operator_key is configured."
        };
        return RequestError::unauthorized(message).into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    let mut e = RequestError::not_found("Unknown endpoint.");
    e.kind = ErrorKind::NotFound;
    e.into_response()
}
