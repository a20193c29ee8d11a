//! The edge: raw OpenAI requests become [`ValidRequest`]s or OpenAI-shaped 400s. Code behind
//! this module never re-checks a request and cannot be handed an unchecked one.

use tokenfleet_scheduler::JobClass;

use crate::config::CoordinatorConfig;
use crate::domain::error::RequestError;
use crate::domain::request::{Endpoint, Message, Prompt, Sampling, ValidRequest};
use crate::openai::wire::{
    ChatCompletionRequest, CompletionRequest, ContentField, Extension, PromptField, RequestMessage,
    StopField,
};

/// Stop sequences per request, as OpenAI allows.
const MAX_STOP: usize = 4;
/// Longest stop sequence, in bytes. OpenAI documents no bound; without one a client makes
/// every vehicle match a megabyte against each token's text tail. Stop markers in use
/// (`</answer>`, `\n\nHuman:`, `###`) are a few bytes; 256 leaves room for multi-line ones.
pub const MAX_STOP_BYTES: usize = 256;

fn stops(stop: Option<StopField>) -> Result<Vec<String>, RequestError> {
    let list = match stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if list.len() > MAX_STOP {
        return Err(RequestError::invalid(
            format!("at most {MAX_STOP} stop sequences are supported"),
            Some("stop"),
        ));
    }
    if let Some(long) = list.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(RequestError::invalid(
            format!(
                "a stop sequence is {} bytes; at most {MAX_STOP_BYTES} are supported",
                long.len()
            ),
            Some("stop"),
        ));
    }
    Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
}

fn n_is_one(n: Option<u32>) -> Result<(), RequestError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(RequestError::invalid(
            format!("n={n} is not supported: tokenfleet returns exactly one choice (n=1)"),
            Some("n"),
        )
        .with_code("unsupported_value")),
    }
}

fn sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
) -> Result<Sampling, RequestError> {
    let temperature = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(RequestError::invalid(
            "temperature must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(RequestError::invalid(
            "top_p must be in (0, 1]",
            Some("top_p"),
        ));
    }
    // A job keeps its seed for life, so a generation resumed on another vehicle samples the
    // same continuation; without a client seed we draw one at acceptance.
    let seed = match seed {
        Some(s) => s as u64,
        None => rand::random(),
    };
    Ok(Sampling {
        temperature,
        top_p,
        seed,
    })
}

fn max_tokens(
    requested: Option<u32>,
    config: &CoordinatorConfig,
    param: &str,
) -> Result<u32, RequestError> {
    match requested {
        None => Ok(config.default_max_tokens),
        Some(0) => Err(RequestError::invalid(
            format!("{param} must be at least 1"),
            Some(param),
        )),
        Some(n) if n > config.max_tokens_limit => Err(RequestError::invalid(
            format!(
                "{param} is {n}, above this fleet's limit of {}",
                config.max_tokens_limit
            ),
            Some(param),
        )),
        Some(n) => Ok(n),
    }
}

struct ExtensionFields {
    class: JobClass,
    residency: Option<Vec<String>>,
    deadline_ms: Option<u64>,
    sensitive: bool,
    ignore_eos: bool,
}

fn extension(ext: Option<Extension>) -> Result<ExtensionFields, RequestError> {
    let ext = ext.unwrap_or_default();
    let class = match ext.class.as_deref() {
        None | Some("interactive") => JobClass::Interactive,
        Some("batch") => JobClass::Batch,
        Some(other) => {
            return Err(RequestError::invalid(
                format!("tokenfleet.class must be \"interactive\" or \"batch\", not {other:?}"),
                Some("tokenfleet.class"),
            ))
        }
    };
    if let Some(r) = &ext.residency {
        if r.is_empty() || r.iter().any(|s| s.trim().is_empty()) {
            return Err(RequestError::invalid(
                "tokenfleet.residency must list at least one region name",
                Some("tokenfleet.residency"),
            ));
        }
    }
    Ok(ExtensionFields {
        class,
        residency: ext.residency,
        deadline_ms: ext.deadline.map(|s| s.saturating_mul(1000)),
        sensitive: ext.sensitive,
        ignore_eos: ext.ignore_eos,
    })
}

fn check_prompt_size(
    chars: usize,
    config: &CoordinatorConfig,
    param: &str,
) -> Result<(), RequestError> {
    if chars > config.max_prompt_chars {
        return Err(RequestError::invalid(
            format!(
                "the prompt has {chars} characters; this fleet accepts at most {}",
                config.max_prompt_chars
            ),
            Some(param),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

/// `messages[i]`: a supported role (`developer` is the system role) and text content only.
fn message(i: usize, m: RequestMessage) -> Result<Message, RequestError> {
    if !matches!(
        m.role.as_str(),
        "system" | "developer" | "user" | "assistant"
    ) {
        return Err(RequestError::invalid(
            format!("messages[{i}].role {:?} is not supported", m.role),
            Some(&format!("messages[{i}].role")),
        ));
    }
    let content = match m.content {
        None => String::new(),
        Some(ContentField::Text(t)) => t,
        Some(ContentField::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                if p.kind != "text" {
                    return Err(RequestError::invalid(
                        format!(
                            "messages[{i}] has a {:?} part; only text is supported",
                            p.kind
                        ),
                        Some(&format!("messages[{i}].content")),
                    ));
                }
                text.push_str(p.text.as_deref().unwrap_or(""));
            }
            text
        }
    };
    let role = if m.role == "developer" {
        "system".to_string()
    } else {
        m.role
    };
    Ok(Message { role, content })
}

pub fn validate_chat(
    req: ChatCompletionRequest,
    config: &CoordinatorConfig,
) -> Result<ValidRequest, RequestError> {
    n_is_one(req.n)?;
    if req.tools.is_some() {
        return Err(
            RequestError::invalid("tools are not supported", Some("tools"))
                .with_code("unsupported_parameter"),
        );
    }
    if let Some(fmt) = &req.response_format {
        if fmt.get("type").and_then(|t| t.as_str()) != Some("text") {
            return Err(RequestError::invalid(
                "only response_format {\"type\": \"text\"} is supported",
                Some("response_format"),
            )
            .with_code("unsupported_value"));
        }
    }
    if req.messages.is_empty() {
        return Err(RequestError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let messages = req
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    check_prompt_size(
        messages.iter().map(|m| m.content.chars().count()).sum(),
        config,
        "messages",
    )?;
    let top_logprobs = req.top_logprobs.unwrap_or(0);
    if top_logprobs > 20 {
        return Err(RequestError::invalid(
            "top_logprobs must be between 0 and 20",
            Some("top_logprobs"),
        ));
    }
    let logprobs = req.logprobs.unwrap_or(false);
    if top_logprobs > 0 && !logprobs {
        return Err(RequestError::invalid(
            "top_logprobs requires logprobs: true",
            Some("top_logprobs"),
        ));
    }
    let (param, requested) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(n), _) => ("max_completion_tokens", Some(n)),
        (None, n) => ("max_tokens", n),
    };
    let ext = extension(req.tokenfleet)?;
    Ok(ValidRequest {
        endpoint: Endpoint::ChatCompletions,
        model: req.model,
        prompt: Prompt::Chat(messages),
        max_tokens: max_tokens(requested, config, param)?,
        sampling: sampling(req.temperature, req.top_p, req.seed)?,
        stop: stops(req.stop)?,
        logprobs,
        top_logprobs,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        class: ext.class,
        residency: ext.residency,
        deadline_ms: ext.deadline_ms,
        sensitive: ext.sensitive,
        ignore_eos: ext.ignore_eos,
        body_sha256: None,
    })
}

pub fn validate_completion(
    req: CompletionRequest,
    config: &CoordinatorConfig,
) -> Result<ValidRequest, RequestError> {
    n_is_one(req.n)?;
    if req.echo == Some(true) {
        return Err(RequestError::invalid("echo is not supported", Some("echo"))
            .with_code("unsupported_parameter"));
    }
    let prompt = match req.prompt {
        PromptField::One(p) => p,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(_) => {
            return Err(RequestError::invalid(
                "exactly one prompt per request is supported",
                Some("prompt"),
            ))
        }
    };
    if prompt.is_empty() {
        return Err(RequestError::invalid(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    check_prompt_size(prompt.chars().count(), config, "prompt")?;
    let top = req.logprobs.unwrap_or(0);
    if top > 5 {
        return Err(RequestError::invalid(
            "logprobs must be between 0 and 5",
            Some("logprobs"),
        ));
    }
    let ext = extension(req.tokenfleet)?;
    Ok(ValidRequest {
        endpoint: Endpoint::Completions,
        model: req.model,
        prompt: Prompt::Text(prompt),
        max_tokens: max_tokens(req.max_tokens.or(Some(16)), config, "max_tokens")?,
        sampling: sampling(req.temperature, req.top_p, req.seed)?,
        stop: stops(req.stop)?,
        logprobs: req.logprobs.is_some(),
        top_logprobs: top,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        class: ext.class,
        residency: ext.residency,
        deadline_ms: ext.deadline_ms,
        sensitive: ext.sensitive,
        ignore_eos: ext.ignore_eos,
        body_sha256: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(json: serde_json::Value) -> Result<ValidRequest, RequestError> {
        validate_chat(
            serde_json::from_value(json).unwrap(),
            &CoordinatorConfig::default(),
        )
    }

    #[test]
    fn a_plain_chat_request_is_valid_with_defaults() {
        let v = chat(
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert_eq!(v.max_tokens, 512);
        assert_eq!(v.class, JobClass::Interactive);
        assert_eq!(
            v.prompt,
            Prompt::Chat(vec![Message {
                role: "user".into(),
                content: "hi".into()
            }])
        );
    }

    #[test]
    fn n_above_one_is_unsupported() {
        let e = chat(serde_json::json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "hi"}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        assert_eq!(e.kind, crate::domain::error::ErrorKind::InvalidRequest);
    }

    #[test]
    fn max_completion_tokens_wins_and_is_bounded() {
        let v = chat(
            serde_json::json!({"model": "m", "max_tokens": 5, "max_completion_tokens": 7,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert_eq!(v.max_tokens, 7);
        let e = chat(serde_json::json!({"model": "m", "max_tokens": 100000,
            "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn extension_fields_are_read_and_checked() {
        let v = chat(
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tokenfleet": {"residency": ["EU"], "class": "batch", "deadline": 10}}),
        )
        .unwrap();
        assert_eq!(v.residency, Some(vec!["EU".to_string()]));
        assert_eq!(v.class, JobClass::Batch);
        assert_eq!(v.deadline_ms, Some(10_000));
        assert!(chat(
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tokenfleet": {"class": "urgent"}})
        )
        .is_err());
    }

    #[test]
    fn oversized_prompts_and_bad_sampling_are_rejected() {
        let long = "x".repeat(70_000);
        let e = chat(
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": long}]}),
        )
        .unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(chat(serde_json::json!({"model": "m", "temperature": 3.0, "messages": [{"role": "user", "content": "hi"}]})).is_err());
        assert!(chat(serde_json::json!({"model": "m", "top_p": 0.0, "messages": [{"role": "user", "content": "hi"}]})).is_err());
    }
}
