//! Response bodies and stream chunks in OpenAI's shapes.

use serde_json::{json, Value};

use crate::domain::request::{Endpoint, ValidRequest};
use crate::domain::store::StoredToken;

fn text_of(tokens: &[StoredToken]) -> String {
    tokens.iter().map(|t| t.text.as_str()).collect()
}

fn chat_logprobs(tokens: &[StoredToken]) -> Value {
    json!({"content": tokens.iter().map(|t| json!({
        "token": t.text,
        "logprob": t.logprob,
        "bytes": t.text.as_bytes(),
        "top_logprobs": t.top.iter().map(|(text, lp)| json!({
            "token": text, "logprob": lp, "bytes": text.as_bytes(),
        })).collect::<Vec<_>>(),
    })).collect::<Vec<_>>()})
}

fn completion_logprobs(tokens: &[StoredToken], offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    let mut at = offset;
    for t in tokens {
        text_offset.push(at);
        at += t.text.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| &t.text).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// The whole answer of a non-streaming request.
pub fn full(
    r: &ValidRequest,
    id: &str,
    created: u64,
    tokens: &[StoredToken],
    tail: &str,
    finish_reason: &str,
    prompt_tokens: u32,
) -> Value {
    let text = text_of(tokens) + tail;
    let usage = usage(prompt_tokens, tokens.len() as u32);
    match r.endpoint {
        Endpoint::ChatCompletions => json!({
            "id": id, "object": "chat.completion", "created": created, "model": r.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": if r.logprobs { chat_logprobs(tokens) } else { Value::Null },
                "finish_reason": finish_reason,
            }],
            "usage": usage,
        }),
        Endpoint::Completions => json!({
            "id": id, "object": "text_completion", "created": created, "model": r.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0, "text": text,
                "logprobs": if r.logprobs { completion_logprobs(tokens, 0) } else { Value::Null },
                "finish_reason": finish_reason,
            }],
            "usage": usage,
        }),
    }
}

fn chunk(r: &ValidRequest, id: &str, created: u64, choice: Value) -> Value {
    let object = match r.endpoint {
        Endpoint::ChatCompletions => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    json!({"id": id, "object": object, "created": created, "model": r.model,
           "system_fingerprint": null, "choices": [choice]})
}

/// The first chat chunk, announcing the assistant role.
pub fn role_chunk(r: &ValidRequest, id: &str, created: u64) -> Value {
    chunk(
        r,
        id,
        created,
        json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
    )
}

/// New tokens.
pub fn token_chunk(r: &ValidRequest, id: &str, created: u64, tokens: &[StoredToken]) -> Value {
    let text = text_of(tokens);
    match r.endpoint {
        Endpoint::ChatCompletions => chunk(
            r,
            id,
            created,
            json!({
                "index": 0, "delta": {"content": text},
                "logprobs": if r.logprobs { chat_logprobs(tokens) } else { Value::Null },
                "finish_reason": null,
            }),
        ),
        Endpoint::Completions => chunk(
            r,
            id,
            created,
            json!({
                "index": 0, "text": text,
                "logprobs": if r.logprobs { completion_logprobs(tokens, 0) } else { Value::Null },
                "finish_reason": null,
            }),
        ),
    }
}

/// The last chunk: any held-back text and the finish reason.
pub fn final_chunk(
    r: &ValidRequest,
    id: &str,
    created: u64,
    tail: &str,
    finish_reason: &str,
) -> Value {
    match r.endpoint {
        Endpoint::ChatCompletions => {
            let delta = if tail.is_empty() {
                json!({})
            } else {
                json!({"content": tail})
            };
            chunk(
                r,
                id,
                created,
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}),
            )
        }
        Endpoint::Completions => chunk(
            r,
            id,
            created,
            json!({"index": 0, "text": tail, "logprobs": null, "finish_reason": finish_reason}),
        ),
    }
}

/// `stream_options.include_usage`: a last chunk with no choices and the usage.
pub fn usage_chunk(
    r: &ValidRequest,
    id: &str,
    created: u64,
    prompt_tokens: u32,
    completion_tokens: u32,
) -> Value {
    let mut c = chunk(r, id, created, Value::Null);
    c["choices"] = json!([]);
    c["usage"] = usage(prompt_tokens, completion_tokens);
    c
}
