//! The HTTP API: routes, authentication, and the small endpoints.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::batch_runner::BatchRunner;
use axum::{Json, Router};

use crate::config::CoordinatorConfig;
use crate::error::ApiError;
use crate::manager::{unix_ms, Manager};
use crate::metrics::Metrics;
use crate::openai::{ModelList, ModelObject};
use crate::store::Store;

pub struct AppState {
    pub manager: Manager,
    pub batches: BatchRunner,
    pub store: Store,
    pub config: Arc<CoordinatorConfig>,
    pub metrics: Arc<Metrics>,
    /// API key → tenant.
    pub keys: HashMap<String, String>,
    /// Per-tenant residency and rate limits.
    pub tenants: Arc<crate::tenants::Tenants>,
    /// Residency regions, to refuse requests naming a region that does not exist.
    pub regions: Arc<crate::regions::RegionMap>,
}

pub type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route(
            "/v1/chat/completions",
            post(crate::generate::chat_completions),
        )
        .route("/v1/completions", post(crate::generate::completions))
        .route("/v1/models", get(models))
        .route(
            "/v1/files",
            post(crate::files::upload)
                .get(crate::files::list)
                // The file limit, plus room for the multipart framing around the file.
                .layer(DefaultBodyLimit::max(
                    state.config.max_file_bytes.saturating_add(64 << 10),
                )),
        )
        .route(
            "/v1/files/{id}",
            get(crate::files::retrieve).delete(crate::files::delete),
        )
        .route("/v1/files/{id}/content", get(crate::files::content))
        .route(
            "/v1/batches",
            post(crate::batches::create).get(crate::batches::list),
        )
        .route("/v1/batches/{id}", get(crate::batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(crate::batches::cancel))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The tenant behind the request's bearer key.
pub fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            )
        })?
        .to_str()
        .map_err(|_| ApiError::unauthorized("The Authorization header is not valid text."))?;
    let key = value
        .strip_prefix("Bearer ")
        .ok_or_else(|| {
            ApiError::unauthorized("The Authorization header must be 'Bearer YOUR_KEY'.")
        })?
        .trim();
    state
        .keys
        .get(key)
        .cloned()
        .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))
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

async fn healthz(State(state): State<Shared>) -> Response {
    let queued = state.manager.queue_len().await;
    Json(serde_json::json!({"status": "ok", "queued_jobs": queued})).into_response()
}

async fn metrics(State(state): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    let mut e = ApiError::not_found("Unknown endpoint.");
    e.status = StatusCode::NOT_FOUND;
    e.into_response()
}
