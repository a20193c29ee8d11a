//! `/v1/files`: upload (multipart, `purpose=batch`, size-limited, JSONL checked line by line,
//! within the tenant's file count and bytes),
//! list, retrieve, content, delete. Files belong to the API key's tenant; another tenant's
//! file is a 404 and never listed.

use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::batch::input::check_input;
use crate::batch::store::{NewFile, OverLimit};
use crate::batch::types::{FileObject, ListPage, PURPOSE_BATCH};
use crate::clock::unix_s;
use crate::http::api::{authenticate, Shared};
use crate::http::error::{json_or_error, ErrorKind, RequestError};

pub fn no_such_file(id: &str) -> RequestError {
    RequestError::not_found(format!("No such File object: {id}"))
}

fn too_large(limit: usize) -> RequestError {
    let mut e = RequestError::invalid(
        format!("The file is larger than this fleet's limit of {limit} bytes."),
        Some("file"),
    )
    .with_code("file_too_large");
    e.kind = ErrorKind::PayloadTooLarge;
    e
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> RequestError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return too_large(limit);
    }
    RequestError::invalid(
        format!("could not read the multipart body: {}", e.body_text()),
        None,
    )
}

pub async fn upload(
    State(state): State<Shared>,
    headers: HeaderMap,
    multipart: Multipart,
) -> Response {
    json_or_error(upload_inner(&state, &headers, multipart).await)
}

async fn upload_inner(
    state: &Shared,
    headers: &HeaderMap,
    mut multipart: Multipart,
) -> Result<FileObject, RequestError> {
    let tenant = authenticate(state, headers)?;
    let limit = state.config.max_file_bytes;
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        match field.name() {
            Some("purpose") => {
                purpose = Some(field.text().await.map_err(|e| multipart_error(e, limit))?)
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let bytes = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
                file = Some((name, bytes));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| {
        RequestError::invalid("purpose is required", Some("purpose"))
            .with_code("missing_required_parameter")
    })?;
    if purpose != PURPOSE_BATCH {
        return Err(RequestError::invalid(
            format!("purpose {purpose:?} is not supported; this fleet stores files for \"batch\""),
            Some("purpose"),
        )
        .with_code("unsupported_value"));
    }
    let (filename, content) = file.ok_or_else(|| {
        RequestError::invalid("file is required", Some("file"))
            .with_code("missing_required_parameter")
    })?;
    if content.len() > limit {
        return Err(too_large(limit));
    }
    check_input(&content, state.config.max_batch_requests)?;
    let object = FileObject::new(
        format!("file-{}", hex::encode(rand::random::<[u8; 12]>())),
        content.len() as u64,
        unix_s(),
        filename,
        PURPOSE_BATCH,
    );
    let (max_files, max_bytes) = (
        state.config.max_files_per_tenant,
        state.config.max_file_bytes_per_tenant,
    );
    let stored = state
        .store
        .insert_file_within(
            NewFile {
                file: (&object).into(),
                tenant: tenant.clone(),
                content: content.to_vec(),
            },
            max_files,
            max_bytes,
        )
        .await?;
    if let Err(OverLimit::Files { count, bytes }) = stored {
        return Err(RequestError::invalid(
            format!(
                "This API key's tenant holds {count} files ({bytes} bytes); the limit is {max_files} files and {max_bytes} bytes. Delete files you no longer need."
            ),
            Some("file"),
        )
        .with_code("file_limit_exceeded"));
    }
    tracing::info!(file = %object.id, tenant, bytes = object.bytes, "file stored");
    Ok(object)
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: Option<usize>,
    pub purpose: Option<String>,
}

/// `limit` as OpenAI bounds it: default 20, at most `max`.
pub fn page_limit(limit: Option<usize>, max: usize) -> Result<usize, RequestError> {
    match limit {
        None => Ok(20.min(max)),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(RequestError::invalid(
            format!("limit must be between 1 and {max}"),
            Some("limit"),
        )),
    }
}

pub async fn list(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let result = async {
        let tenant = authenticate(&state, &headers)?;
        let limit = page_limit(q.limit, 10_000)?;
        let (files, more) = state
            .store
            .list_files(&tenant, q.purpose, q.after, limit)
            .await?;
        Ok::<_, RequestError>(ListPage::new(files, more, |f| f.id.clone()))
    };
    json_or_error(result.await)
}

pub async fn retrieve(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let tenant = authenticate(&state, &headers)?;
        state
            .store
            .file(&tenant, &id)
            .await?
            .ok_or_else(|| no_such_file(&id))
    };
    json_or_error(result.await)
}

pub async fn content(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let tenant = authenticate(&state, &headers)?;
        state
            .store
            .batches()
            .file_content(&tenant, &id)
            .await?
            .ok_or_else(|| no_such_file(&id))
    };
    match result.await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn delete(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let tenant = authenticate(&state, &headers)?;
        if !state.store.batches().delete_file(&tenant, &id).await? {
            return Err(no_such_file(&id));
        }
        Ok(serde_json::json!({"id": id, "object": "file", "deleted": true}))
    };
    json_or_error(result.await)
}
