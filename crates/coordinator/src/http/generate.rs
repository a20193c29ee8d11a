//! `POST /v1/chat/completions` and `POST /v1/completions`: accept, store, follow the job.
//!
//! A request is validated, stored (durably before the client hears anything), and handed to the
//! manager; the handler follows the job's
//! token list from its own index, so a job that moves between vehicles mid-answer reaches the
//! client once per token. Streaming answers start only when the first token (or an error) is
//! there, so an error the vehicle reports before any token is still a proper HTTP error.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use tokenfleet_scheduler::JobClass;
use tokio::sync::watch;

use crate::clock::unix_ms;
use crate::domain::error::{ErrorKind, RequestError};
use crate::domain::job::{JobHandle, JobOutcome, JobView};
use crate::domain::request::{Endpoint, ValidRequest};
use crate::domain::store::{JobState, StoredJob, StoredToken};
use crate::fleet::manager::{Manager, NewJob};
use crate::http::api::{authenticate, Shared};
use crate::openai::responses;
use crate::openai::validation::{validate_chat, validate_completion};

const IDEMPOTENCY_HEADER: &str = "idempotency-key";
const JOB_ID_HEADER: &str = "x-tokenfleet-job-id";

pub async fn chat_completions(
    state: State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let endpoint_label = "chat_completions";
    let response = generate(state.0.clone(), headers, body, Endpoint::ChatCompletions).await;
    state
        .metrics
        .requests
        .with_label_values(&[endpoint_label, response.status().as_str()])
        .inc();
    response
}

pub async fn completions(
    state: State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let response = generate(state.0.clone(), headers, body, Endpoint::Completions).await;
    state
        .metrics
        .requests
        .with_label_values(&["completions", response.status().as_str()])
        .inc();
    response
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, RequestError> {
    body.map_err(|rejection| {
        let mut e = RequestError::invalid(rejection.body_text(), None);
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            e.kind = ErrorKind::PayloadTooLarge;
            e.message = "The request body is too large for this fleet.".into();
            e.code = Some("request_too_large");
        }
        e
    })
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RequestError> {
    serde_json::from_slice(bytes).map_err(|e| {
        RequestError::invalid(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
    })
}

/// SHA-256 (hex) of a JSON body in canonical form: object keys sorted (serde_json's map is
/// ordered), no insignificant whitespace. Two bodies that differ only in layout or key order
/// hash the same.
fn canonical_sha256(bytes: &[u8]) -> Result<String, RequestError> {
    use sha2::{Digest, Sha256};
    let value: serde_json::Value = parse(bytes)?;
    let canonical = serde_json::to_vec(&value)
        .map_err(|e| RequestError::internal(format!("re-encoding a parsed body: {e}")))?;
    Ok(hex::encode(Sha256::digest(&canonical)))
}

async fn generate(
    state: Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    match accept(&state, &headers, body, endpoint).await {
        Ok(Accepted::Live(handle)) => respond(state.manager.clone(), *handle).await,
        Ok(Accepted::Finished(job)) => respond_stored(job),
        Err(e) => e.into_response(),
    }
}

/// Refuses a request whose prompt and `max_tokens` together exceed the largest context any
/// connected vehicle holding its model offers (counted with the coordinator's trusted copy of
/// the model; not checked when the coordinator holds none, and then vehicles refuse it and
/// the client gets a 503 after they have).
async fn check_context(state: &Shared, request: &ValidRequest) -> Result<(), RequestError> {
    let Some(limit) = state.manager.context_limit(&request.model) else {
        return Ok(());
    };
    let Some(counted) = state.prompts.count(&request.model, &request.prompt).await else {
        return Ok(());
    };
    let (what, param) = match request.prompt {
        crate::domain::request::Prompt::Chat(_) => ("messages", "messages"),
        crate::domain::request::Prompt::Text(_) => ("prompt", "prompt"),
    };
    let prompt = counted.map_err(|e| RequestError::invalid(e, Some(param)))?;
    let needed = prompt + request.max_tokens as usize;
    if needed > limit as usize {
        return Err(RequestError::invalid(
            format!(
                "This model's maximum context length is {limit} tokens. However, you requested \
                 {needed} tokens ({prompt} in the {what}, {} in the completion). Please reduce \
                 the length of the {what} or completion.",
                request.max_tokens
            ),
            Some(param),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

enum Accepted {
    Live(Box<JobHandle>),
    Finished(Box<StoredJob>),
}

async fn accept(
    state: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Accepted, RequestError> {
    let tenant = authenticate(state, headers)?;
    let bytes = body_bytes(body)?;
    let mut request: ValidRequest = match endpoint {
        Endpoint::ChatCompletions => validate_chat(parse(&bytes)?, &state.config)?,
        Endpoint::Completions => validate_completion(parse(&bytes)?, &state.config)?,
    };
    state.tenants.bind(&tenant, &mut request, &state.regions)?;
    if request.class == JobClass::Batch && request.deadline_ms.is_none() {
        request.deadline_ms = Some(unix_ms() + state.config.http_batch_deadline.as_millis() as u64);
    }
    state
        .tenants
        .admit(&tenant, &request, std::time::Instant::now())?;
    if !state.manager.has_model(&request.model) {
        return Err(RequestError::model_not_found(&request.model));
    }
    check_context(state, &request).await?;
    let key = idempotency_key(headers, &bytes, &mut request)?;
    submit(state, tenant, request, key, endpoint).await
}

/// Stores the job (before the client gets any byte back) and hands it to the manager.
async fn submit(
    state: &Shared,
    tenant: String,
    request: ValidRequest,
    key: Option<String>,
    endpoint: Endpoint,
) -> Result<Accepted, RequestError> {
    let prefix = match endpoint {
        Endpoint::ChatCompletions => "chatcmpl-",
        Endpoint::Completions => "cmpl-",
    };
    let public_id = format!("{prefix}{}", hex::encode(rand::random::<[u8; 12]>()));
    let created_ms = unix_ms();
    // Stored before the client gets any byte back. A request without an idempotency key is
    // dispatched while its insert commits (the store answers after the sync of the group the
    // insert joined); one with a key is checked against earlier requests first.
    let (id, durable) = match key {
        None => {
            let (id, durable) = state
                .store
                .queue_job(public_id.clone(), tenant.clone(), &request, created_ms)
                .await?;
            (id, Some(durable))
        }
        Some(key) => match state
            .store
            .insert_job(
                public_id.clone(),
                tenant.clone(),
                Some(key),
                &request,
                created_ms,
            )
            .await?
        {
            Ok(id) => (id, None),
            Err(existing) => {
                return follow_existing(state, existing, &tenant, &request).await;
            }
        },
    };
    let handle = state
        .manager
        .submit(NewJob {
            id,
            public_id,
            tenant,
            request,
            created_ms,
        })
        .await;
    if let Some(durable) = durable {
        if let Err(e) = durable.wait().await {
            // Never acknowledged, so nothing is lost: stop the job wherever it started.
            if handle.is_ok() {
                state.manager.cancel(id).await;
            }
            return Err(e.into());
        }
    }
    if handle.is_err() {
        let _ = state
            .store
            .finish_job(
                id,
                crate::domain::store::Outcome {
                    state: JobState::Failed,
                    finished_ms: unix_ms(),
                    finish_reason: None,
                    text_tail: String::new(),
                    prompt_tokens: 0,
                    error: Some("rejected: queue full".into()),
                },
            )
            .await;
    }
    Ok(Accepted::Live(Box::new(handle?)))
}

/// The request's `Idempotency-Key`, if any; a keyed request carries its body's hash so a
/// retry with another body is told apart.
fn idempotency_key(
    headers: &HeaderMap,
    bytes: &[u8],
    request: &mut ValidRequest,
) -> Result<Option<String>, RequestError> {
    Ok(match headers.get(IDEMPOTENCY_HEADER) {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    RequestError::invalid(
                        "Idempotency-Key must be 1–255 visible ASCII characters",
                        Some("Idempotency-Key"),
                    )
                })?;
            request.body_sha256 = Some(canonical_sha256(bytes)?);
            Some(k.to_string())
        }
    })
}

/// A retry of a request we already accepted: follow the same job, or answer from the store.
/// The key reused with a different body is a client error (422, as payment APIs answer), not
/// the first request's answer.
async fn follow_existing(
    state: &Shared,
    existing: u64,
    tenant: &str,
    retry: &ValidRequest,
) -> Result<Accepted, RequestError> {
    let same_body = |first: &ValidRequest| match (&first.body_sha256, &retry.body_sha256) {
        (Some(a), Some(b)) if a != b => Err(RequestError::idempotency_key_reused()),
        // Jobs stored before bodies were hashed carry no hash: nothing to compare.
        _ => Ok(()),
    };
    if let Some(handle) = state.manager.attach(existing).await {
        same_body(&handle.request)?;
        return Ok(Accepted::Live(Box::new(handle)));
    }
    let job = state
        .store
        .load_job(existing)
        .await?
        .ok_or_else(|| RequestError::internal("job vanished from the store"))?;
    if job.tenant != tenant {
        return Err(RequestError::not_found("No such job."));
    }
    same_body(&job.request)?;
    if job.state == JobState::Queued && state.config.cluster.is_some() {
        // Another coordinator of the cluster runs it (or ran it and died): follow it there,
        // and take it over here when its coordinator's lease runs out.
        let handle = crate::fleet::follow::follow(state.store.clone(), state.manager.clone(), &job);
        return Ok(Accepted::Live(Box::new(handle)));
    }
    if job.state == JobState::Cancelled {
        // Cancelled because its client went away (a dropped connection, a coordinator
        // restart): the same request again runs it again, from the tokens it has.
        if let Some(reopened) = state.store.reopen_cancelled(existing).await? {
            if let Some(handle) = state.manager.resume(reopened).await {
                return Ok(Accepted::Live(Box::new(handle)));
            }
        }
    }
    Ok(Accepted::Finished(Box::new(job)))
}

/// Cancels the job if the client goes away before it ends, whatever its class: nobody else
/// will read the answer (Batch API lines are never followed by a client, so never behind
/// this guard).
struct CancelOnDrop {
    manager: Manager,
    job: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let manager = self.manager.clone();
            let job = self.job;
            tokio::spawn(async move { manager.cancel(job).await });
        }
    }
}

/// Waits until the job has tokens past `from` or has ended; returns the new tokens.
async fn next(
    view: &mut watch::Receiver<JobView>,
    from: &mut usize,
) -> (Vec<StoredToken>, Option<JobOutcome>, u32) {
    loop {
        {
            let v = view.borrow_and_update();
            // Tokens are only ever discarded (a restart after failed verification) for jobs
            // whose client has not seen any streamed, so a shorter list means start over.
            *from = (*from).min(v.tokens.len());
            if v.tokens.len() > *from || v.outcome.is_some() {
                let new = v.tokens[*from..].to_vec();
                *from = v.tokens.len();
                return (new, v.outcome.clone(), v.prompt_tokens);
            }
        }
        if view.changed().await.is_err() {
            let v = view.borrow();
            *from = (*from).min(v.tokens.len());
            let outcome = v
                .outcome
                .clone()
                .or(Some(JobOutcome::Failed(RequestError::internal(
                    "the job ended unexpectedly",
                ))));
            let new = v.tokens[*from..].to_vec();
            *from = v.tokens.len();
            return (new, outcome, v.prompt_tokens);
        }
    }
}

/// A non-streamed answer: the whole response once the job has ended.
async fn respond_whole(mut guard: CancelOnDrop, mut handle: JobHandle) -> Response {
    let mut from = 0usize;
    loop {
        let (_, outcome, prompt_tokens) = next(&mut handle.view, &mut from).await;
        if let Some(outcome) = outcome {
            // The job's final tokens (it may have restarted from scratch on the way).
            let tokens = handle.view.borrow().tokens.clone();
            guard.armed = false;
            return match outcome {
                JobOutcome::Done {
                    finish_reason,
                    text_tail,
                    ..
                } => with_job_id(
                    Json(responses::full(
                        &handle.request,
                        &handle.public_id,
                        handle.created_s,
                        &tokens,
                        &text_tail,
                        &finish_reason,
                        prompt_tokens,
                    ))
                    .into_response(),
                    &handle.public_id,
                ),
                JobOutcome::Failed(e) => e.into_response(),
                JobOutcome::Cancelled => {
                    RequestError::unavailable("the request was cancelled").into_response()
                }
            };
        }
    }
}

async fn respond(manager: Manager, mut handle: JobHandle) -> Response {
    let guard = CancelOnDrop {
        manager,
        job: handle.id,
        armed: true,
    };
    if !handle.request.stream {
        return respond_whole(guard, handle).await;
    }
    let mut from = 0usize;
    // Streaming: wait for the first token or an early error.
    let (first, outcome, prompt_tokens) = next(&mut handle.view, &mut from).await;
    if first.is_empty() {
        if let Some(JobOutcome::Failed(e)) = &outcome {
            return e.clone().into_response();
        }
    }
    let public_id = handle.public_id.clone();
    let stream = async_stream::stream! {
        let mut guard = guard;
        let mut handle = handle;
        let r = handle.request.clone();
        let (id, created) = (handle.public_id.clone(), handle.created_s);
        let mut completion_tokens = first.len() as u32;
        let mut prompt_tokens = prompt_tokens;
        if r.endpoint == Endpoint::ChatCompletions {
            yield Ok::<Event, std::convert::Infallible>(Event::default().data(responses::role_chunk(&r, &id, created).to_string()));
        }
        let mut pending = Some((first, outcome));
        loop {
            let (new, outcome) = match pending.take() {
                Some(p) => p,
                None => {
                    let (n, o, p) = next(&mut handle.view, &mut from).await;
                    prompt_tokens = p;
                    completion_tokens += n.len() as u32;
                    (n, o)
                }
            };
            if !new.is_empty() {
                yield Ok(Event::default().data(responses::token_chunk(&r, &id, created, &new).to_string()));
            }
            if let Some(outcome) = outcome {
                guard.armed = false;
                match outcome {
                    JobOutcome::Done { finish_reason, text_tail, prompt_tokens: p } => {
                        let p = if p > 0 { p } else { prompt_tokens };
                        yield Ok(Event::default().data(responses::final_chunk(&r, &id, created, &text_tail, &finish_reason).to_string()));
                        if r.include_usage {
                            yield Ok(Event::default().data(responses::usage_chunk(&r, &id, created, p, completion_tokens).to_string()));
                        }
                    }
                    JobOutcome::Failed(e) => {
                        yield Ok(Event::default().data(crate::http::error::body(&e).to_string()));
                    }
                    JobOutcome::Cancelled => {
                        yield Ok(Event::default().data(crate::http::error::body(&RequestError::unavailable("the request was cancelled")).to_string()));
                    }
                }
                yield Ok(Event::default().data("[DONE]"));
                break;
            }
        }
    };
    with_job_id(
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response(),
        &public_id,
    )
}

fn with_job_id(mut response: Response, public_id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(public_id) {
        response.headers_mut().insert(JOB_ID_HEADER, v);
    }
    response
}

/// A retried request whose job already ended: answer from the store.
fn respond_stored(job: Box<StoredJob>) -> Response {
    match job.state {
        JobState::Done => {
            let r = &job.request;
            let reason = job.finish_reason.clone().unwrap_or_else(|| "stop".into());
            let created = job.created_ms / 1000;
            if !r.stream {
                return with_job_id(
                    Json(responses::full(
                        r,
                        &job.public_id,
                        created,
                        &job.tokens,
                        &job.text_tail,
                        &reason,
                        job.prompt_tokens,
                    ))
                    .into_response(),
                    &job.public_id,
                );
            }
            let mut events: Vec<Result<Event, std::convert::Infallible>> = Vec::new();
            if r.endpoint == Endpoint::ChatCompletions {
                events.push(Ok(Event::default().data(
                    responses::role_chunk(r, &job.public_id, created).to_string(),
                )));
            }
            if !job.tokens.is_empty() {
                events.push(Ok(Event::default().data(
                    responses::token_chunk(r, &job.public_id, created, &job.tokens).to_string(),
                )));
            }
            events.push(Ok(Event::default().data(
                responses::final_chunk(r, &job.public_id, created, &job.text_tail, &reason)
                    .to_string(),
            )));
            if r.include_usage {
                events.push(Ok(Event::default().data(
                    responses::usage_chunk(
                        r,
                        &job.public_id,
                        created,
                        job.prompt_tokens,
                        job.tokens.len() as u32,
                    )
                    .to_string(),
                )));
            }
            events.push(Ok(Event::default().data("[DONE]")));
            Sse::new(futures::stream::iter(events)).into_response()
        }
        JobState::Failed => {
            RequestError::unavailable(job.error.unwrap_or_else(|| "the request failed".into()))
                .into_response()
        }
        JobState::Cancelled => {
            RequestError::unavailable("the request was cancelled").into_response()
        }
        JobState::Queued => {
            RequestError::unavailable("the request is still queued; retry shortly").into_response()
        }
    }
}
