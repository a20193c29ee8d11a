//! `/v1/batches`: create, retrieve, list (`after`/`limit`), cancel. The work itself is the
//! batch runner's ([`crate::batch::runner`]); these handlers check input, store a new batch as
//! `validating` (at most `max_active_batches_per_tenant` of a tenant not yet ended, 429 past
//! it), and read records. Batches belong to the API key's tenant; another tenant's batch is a
//! 404 and never listed.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use crate::batch::input::{metadata_residency, ENDPOINTS};
use crate::batch::runner::no_such_batch;
use crate::batch::store::OverLimit;
use crate::batch::types::{Batch, BatchStatus, ListPage, RequestCounts, PURPOSE_BATCH};
use crate::clock::unix_s;
use crate::config::parse_window;
use crate::http::api::{authenticate, Shared};
use crate::http::error::{json_or_error, RequestError};
use crate::http::files::{no_such_file, page_limit};

#[derive(Debug, Deserialize)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, Value>>,
}

pub async fn create(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    json_or_error(create_inner(&state, &headers, body).await)
}

async fn create_inner(
    state: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Batch, RequestError> {
    let tenant = authenticate(state, headers)?;
    let bytes = body.map_err(|r| RequestError::invalid(r.body_text(), None))?;
    let req: CreateBatch = serde_json::from_slice(&bytes).map_err(|e| {
        RequestError::invalid(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
    })?;
    let window = check_create(state, &req)?;
    if let Some(asked) = metadata_residency(req.metadata.as_ref()) {
        state
            .tenants
            .check_residency(&tenant, &asked, &state.regions, "metadata.residency")?;
    }
    let file = state
        .store
        .file(&tenant, &req.input_file_id)
        .await?
        .ok_or_else(|| no_such_file(&req.input_file_id))?;
    if file.purpose != PURPOSE_BATCH {
        return Err(RequestError::invalid(
            format!(
                "file {} has purpose {:?}, not \"batch\"",
                file.id, file.purpose
            ),
            Some("input_file_id"),
        ));
    }
    let batch = new_batch(req, file.id, window);
    let max_active = state.config.max_active_batches_per_tenant;
    if let Err(OverLimit::ActiveBatches(n)) = state
        .store
        .insert_batch(&tenant, batch.clone(), max_active)
        .await?
    {
        let mut e = RequestError::overloaded(format!(
            "This API key's tenant has {n} batches in progress, the limit is {max_active}; create more once some end."
        ));
        e.param = Some("input_file_id".into());
        return Err(e);
    }
    tracing::info!(batch = %batch.id, tenant, file = %batch.input_file_id, "batch created");
    state.batches.wake();
    Ok(batch)
}

/// The request's own fields: a served endpoint, a configured completion window (returned as a
/// duration) and bounded metadata.
fn check_create(state: &Shared, req: &CreateBatch) -> Result<std::time::Duration, RequestError> {
    if !ENDPOINTS.contains(&req.endpoint.as_str()) {
        return Err(RequestError::invalid(
            format!(
                "endpoint must be one of {ENDPOINTS:?}, not {:?}",
                req.endpoint
            ),
            Some("endpoint"),
        )
        .with_code("unsupported_value"));
    }
    if !state
        .config
        .batch_completion_windows
        .contains(&req.completion_window)
    {
        return Err(RequestError::invalid(
            format!(
                "completion_window must be one of {:?}",
                state.config.batch_completion_windows
            ),
            Some("completion_window"),
        )
        .with_code("unsupported_value"));
    }
    let window = parse_window(&req.completion_window)
        .ok_or_else(|| RequestError::internal("a configured completion window does not parse"))?;
    if let Some(m) = &req.metadata {
        if m.len() > 16
            || m.iter()
                .any(|(k, v)| k.len() > 64 || v.as_str().is_none_or(|s| s.len() > 512))
        {
            return Err(RequestError::invalid(
                "metadata holds at most 16 string values (keys up to 64, values up to 512 characters)",
                Some("metadata"),
            ));
        }
    }
    Ok(window)
}

/// A new batch record, `validating`, expiring `window` from now.
fn new_batch(req: CreateBatch, input_file_id: String, window: std::time::Duration) -> Batch {
    let now = unix_s();
    Batch {
        id: format!("batch_{}", hex::encode(rand::random::<[u8; 12]>())),
        object: "batch".into(),
        endpoint: req.endpoint,
        errors: None,
        input_file_id,
        completion_window: req.completion_window,
        status: BatchStatus::Validating,
        output_file_id: None,
        error_file_id: None,
        created_at: now,
        in_progress_at: None,
        expires_at: now + window.as_secs(),
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts::default(),
        metadata: req.metadata,
    }
}

pub async fn retrieve(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    json_or_error(
        async {
            let tenant = authenticate(&state, &headers)?;
            state
                .store
                .batch(&tenant, &id)
                .await?
                .ok_or_else(|| no_such_batch(&id))
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

pub async fn list(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    json_or_error(
        async {
            let tenant = authenticate(&state, &headers)?;
            let limit = page_limit(q.limit, 100)?;
            let (batches, more) = state.store.list_batches(&tenant, q.after, limit).await?;
            Ok(ListPage::new(batches, more, |b| b.id.clone()))
        }
        .await,
    )
}

pub async fn cancel(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    json_or_error(
        async {
            let tenant = authenticate(&state, &headers)?;
            state.batches.cancel(&tenant, &id).await
        }
        .await,
    )
}
