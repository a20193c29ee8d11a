//! A batch's input file, line by line: the JSONL shape checked when the file is uploaded
//! ([`parse_input`]: one object per line with `custom_id`, `method`, `url`, `body`; unique
//! `custom_id`s), and each line's request validated when a batch starts ([`validate_line`]),
//! where a bad line becomes an entry of the batch's error file rather than failing the batch.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::{json, Value};
use tokenfleet_scheduler::JobClass;

use crate::config::CoordinatorConfig;
use crate::domain::error::RequestError;
use crate::domain::request::ValidRequest;
use crate::openai::validation::{validate_chat, validate_completion};
use crate::openai::wire::{ChatCompletionRequest, CompletionRequest};
use crate::policy::regions::RegionMap;
use crate::policy::tenants::Tenants;

/// Endpoints a batch may target.
pub const ENDPOINTS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// One request line of an input file.
#[derive(Debug, Clone)]
pub struct InputLine {
    /// 1-based line number in the file.
    pub line: u32,
    pub custom_id: String,
    pub url: String,
    pub body: Value,
}

fn bad_line(line: usize, message: impl std::fmt::Display, code: &'static str) -> RequestError {
    RequestError::invalid(format!("line {line}: {message}"), Some("file")).with_code(code)
}

/// Checks the JSONL shape of a batch input file and returns its requests; a 400 names the
/// first offending line.
pub fn parse_input(content: &[u8], max_requests: usize) -> Result<Vec<InputLine>, RequestError> {
    let mut lines = Vec::new();
    each_line(content, max_requests, |l| lines.push(l))?;
    Ok(lines)
}

/// [`parse_input`]'s checks without keeping the requests (an upload): each line's parsed JSON
/// is dropped before the next is read, so checking holds one line's tree at a time.
pub fn check_input(content: &[u8], max_requests: usize) -> Result<usize, RequestError> {
    let mut n = 0;
    each_line(content, max_requests, |_| n += 1)?;
    Ok(n)
}

/// Parses and checks each request line in turn, handing it to `take`. A line's `body` is
/// moved out of its parsed object, never copied: a copy doubled the memory of a large line
/// (issue 13: a 64 MiB line peaked near 2 GiB).
fn each_line(
    content: &[u8],
    max_requests: usize,
    mut take: impl FnMut(InputLine),
) -> Result<(), RequestError> {
    let text = std::str::from_utf8(content).map_err(|e| {
        RequestError::invalid(format!("the file is not UTF-8 text: {e}"), Some("file"))
            .with_code("invalid_file_format")
    })?;
    let mut count = 0usize;
    let mut seen = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(raw)
            .map_err(|e| bad_line(n, format!("not valid JSON: {e}"), "invalid_json_line"))?;
        let Value::Object(mut obj) = v else {
            return Err(bad_line(n, "expected a JSON object", "invalid_json_line"));
        };
        let custom_id = match obj.remove("custom_id") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => s,
            _ => {
                return Err(bad_line(
                    n,
                    "custom_id must be a non-empty string of at most 512 characters",
                    "missing_required_parameter",
                ))
            }
        };
        if obj.get("method").and_then(Value::as_str) != Some("POST") {
            return Err(bad_line(n, "method must be \"POST\"", "invalid_method"));
        }
        let url = match obj.remove("url") {
            Some(Value::String(u)) => u,
            _ => {
                return Err(bad_line(
                    n,
                    "url must be a string",
                    "missing_required_parameter",
                ))
            }
        };
        let body = match obj.remove("body") {
            Some(b @ Value::Object(_)) => b,
            _ => {
                return Err(bad_line(
                    n,
                    "body must be a JSON object",
                    "missing_required_parameter",
                ))
            }
        };
        if !seen.insert(custom_id.clone()) {
            return Err(bad_line(
                n,
                format!("custom_id {custom_id:?} is used by an earlier line; each must be unique"),
                "duplicate_custom_id",
            ));
        }
        count += 1;
        if count > max_requests {
            return Err(RequestError::invalid(
                format!(
                    "the file has more than {max_requests} requests, this fleet's limit per batch"
                ),
                Some("file"),
            )
            .with_code("too_many_requests_in_file"));
        }
        take(InputLine {
            line: n as u32,
            custom_id,
            url,
            body,
        });
    }
    if count == 0 {
        return Err(
            RequestError::invalid("the file has no request lines", Some("file"))
                .with_code("empty_file"),
        );
    }
    Ok(())
}

/// The regions a batch's metadata asks for (`"residency": "EU,CH"`), if any.
pub fn metadata_residency(
    metadata: Option<&serde_json::Map<String, Value>>,
) -> Option<Vec<String>> {
    metadata?
        .get("residency")?
        .as_str()
        .map(|r| {
            r.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .filter(|r| !r.is_empty())
}

/// What every request of one batch shares.
pub struct BatchContext<'a> {
    pub endpoint: &'a str,
    /// Unix ms: the end of the completion window.
    pub deadline_ms: u64,
    /// From the batch's metadata ([`metadata_residency`]).
    pub residency: Option<Vec<String>>,
    pub config: &'a CoordinatorConfig,
    pub has_model: &'a (dyn Fn(&str) -> bool + Sync),
    /// The batch's tenant: every line is bound to its residency and counts against its quota.
    pub tenant: &'a str,
    pub tenants: &'a Tenants,
    pub regions: &'a RegionMap,
    /// Now (UTC seconds), for the daily quota.
    pub unix_s: u64,
}

/// A line's request as the job to run, or the error-file entry (`{"code", "message"}`).
pub fn validate_line(line: &InputLine, ctx: &BatchContext<'_>) -> Result<ValidRequest, Value> {
    let err = |code: &str, message: String| json!({"code": code, "message": message});
    if line.url != ctx.endpoint {
        return Err(err(
            "invalid_url",
            format!(
                "line {}: url {:?} does not match the batch's endpoint {:?}",
                line.line, line.url, ctx.endpoint
            ),
        ));
    }
    // Deserialized from the borrowed tree: no copy of the line's JSON.
    let parsed = match ctx.endpoint {
        "/v1/chat/completions" => ChatCompletionRequest::deserialize(&line.body)
            .map_err(|e| e.to_string())
            .map(|b| validate_chat(b, ctx.config)),
        _ => CompletionRequest::deserialize(&line.body)
            .map_err(|e| e.to_string())
            .map(|b| validate_completion(b, ctx.config)),
    };
    let mut request = match parsed {
        Err(e) => {
            return Err(err(
                "invalid_request",
                format!("line {}: the body is not a valid request: {e}", line.line),
            ))
        }
        Ok(Err(e)) => {
            return Err(err(
                e.code.unwrap_or("invalid_request"),
                format!("line {}: {}", line.line, e.message),
            ))
        }
        Ok(Ok(r)) => r,
    };
    if request.stream {
        return Err(err(
            "invalid_request",
            format!("line {}: stream is not supported in a batch", line.line),
        ));
    }
    if !(ctx.has_model)(&request.model) {
        return Err(err(
            "model_not_found",
            format!(
                "line {}: the model `{}` does not exist or no enrolled vehicle serves it",
                line.line, request.model
            ),
        ));
    }
    request.class = JobClass::Batch;
    request.deadline_ms = Some(match request.deadline_ms {
        Some(d) => d.min(ctx.deadline_ms),
        None => ctx.deadline_ms,
    });
    if ctx.residency.is_some() {
        request.residency = ctx.residency.clone();
    }
    let refused = |e: RequestError| {
        err(
            e.code.unwrap_or("invalid_request"),
            format!("line {}: {}", line.line, e.message),
        )
    };
    ctx.tenants
        .bind(ctx.tenant, &mut request, ctx.regions)
        .map_err(refused)?;
    // Last: a line refused for any other reason uses none of the quota.
    ctx.tenants
        .charge_quota(ctx.tenant, &request, ctx.unix_s)
        .map_err(refused)?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(custom_id: &str, url: &str) -> String {
        json!({"custom_id": custom_id, "method": "POST", "url": url,
               "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}})
        .to_string()
    }

    #[test]
    fn a_well_formed_file_parses_and_skips_blank_lines() {
        let text = format!(
            "{}\n\n{}\n",
            line("a", "/v1/chat/completions"),
            line("b", "/v1/chat/completions")
        );
        let lines = parse_input(text.as_bytes(), 10).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[1].line, lines[1].custom_id.as_str()), (3, "b"));
    }

    #[test]
    fn invalid_json_duplicates_and_missing_fields_name_their_line() {
        let bad_json = format!("{}\n{{not json", line("a", "/v1/chat/completions"));
        let e = parse_input(bad_json.as_bytes(), 10).unwrap_err();
        assert_eq!(e.code, Some("invalid_json_line"));
        assert!(e.message.starts_with("line 2:"), "{}", e.message);
        let dup = format!("{}\n{}", line("a", "/x"), line("a", "/y"));
        assert_eq!(
            parse_input(dup.as_bytes(), 10).unwrap_err().code,
            Some("duplicate_custom_id")
        );
        let no_body = r#"{"custom_id": "a", "method": "POST", "url": "/v1/completions"}"#;
        assert_eq!(
            parse_input(no_body.as_bytes(), 10).unwrap_err().code,
            Some("missing_required_parameter")
        );
        assert_eq!(
            parse_input(b"\n\n", 10).unwrap_err().code,
            Some("empty_file")
        );
        let many = format!("{}\n{}", line("a", "/x"), line("b", "/x"));
        assert_eq!(
            parse_input(many.as_bytes(), 1).unwrap_err().code,
            Some("too_many_requests_in_file")
        );
    }

    fn eu_and_us() -> RegionMap {
        let square = |x: f64| vec![[x, 0.0], [x + 1.0, 0.0], [x + 1.0, 1.0], [x, 1.0], [x, 0.0]];
        let region = |name: &str, x: f64| crate::config::policy::RegionConfig {
            name: name.into(),
            countries: vec![],
            geojson: None,
            polygon: square(x),
        };
        RegionMap::new(&[region("EU", 0.0), region("US", 10.0)], None).unwrap()
    }

    /// Issue 13, hole 4: a batch line is bound by its tenant like an HTTP request: inside the
    /// tenant's residency, in regions that exist, and within the daily quota.
    #[test]
    fn lines_are_bound_to_the_tenants_residency_and_quota() {
        let config = CoordinatorConfig::default();
        let serves_m = |m: &str| m == "m";
        let regions = eu_and_us();
        let tenants = Tenants::new(&[crate::config::policy::TenantConfig {
            name: "eu-bank".into(),
            residency: vec!["EU".into()],
            // Each line below budgets 1 prompt token + 4.
            tokens_per_day: 12,
            ..Default::default()
        }]);
        let ctx = |residency: Option<Vec<String>>| BatchContext {
            endpoint: "/v1/chat/completions",
            deadline_ms: 5_000,
            residency,
            config: &config,
            has_model: &serves_m,
            tenant: "eu-bank",
            tenants: &tenants,
            regions: &regions,
            unix_s: 86_400 * 20_000,
        };
        let lines = parse_input(line("a", "/v1/chat/completions").as_bytes(), 10).unwrap();
        // No residency asked: the tenant's applies.
        let bound = validate_line(&lines[0], &ctx(None)).unwrap();
        assert_eq!(bound.residency, Some(vec!["EU".to_string()]));
        // Outside the tenant's regions: an error entry, not a job that runs anywhere.
        let wider = validate_line(&lines[0], &ctx(Some(vec!["US".into()]))).unwrap_err();
        assert_eq!(wider["code"], "invalid_request", "{wider}");
        assert!(wider["message"].as_str().unwrap().contains("outside"));
        // A line's own unknown region is refused too.
        let mut own = lines[0].clone();
        own.body["tokenfleet"] = json!({"residency": ["Atlantis"]});
        let free = Tenants::default();
        let unbound = BatchContext {
            tenants: &free,
            ..ctx(None)
        };
        let unknown = validate_line(&own, &unbound).unwrap_err();
        assert!(unknown["message"].as_str().unwrap().contains("Atlantis"));
        // The daily quota: 5 + 5 fit in 12 (the first line above used 5), the third does not.
        validate_line(&lines[0], &ctx(None)).unwrap();
        let over = validate_line(&lines[0], &ctx(None)).unwrap_err();
        assert_eq!(over["code"], "insufficient_quota", "{over}");
    }

    #[test]
    fn lines_are_validated_against_the_batch() {
        let config = CoordinatorConfig::default();
        let serves_m = |m: &str| m == "m";
        let (tenants, regions) = (Tenants::default(), eu_and_us());
        let ctx = BatchContext {
            endpoint: "/v1/chat/completions",
            deadline_ms: 5_000,
            residency: Some(vec!["EU".into()]),
            config: &config,
            has_model: &serves_m,
            tenant: "t",
            tenants: &tenants,
            regions: &regions,
            unix_s: 0,
        };
        let lines = parse_input(
            format!(
                "{}\n{}",
                line("a", "/v1/chat/completions"),
                line("b", "/v1/embeddings")
            )
            .as_bytes(),
            10,
        )
        .unwrap();
        let ok = validate_line(&lines[0], &ctx).unwrap();
        assert_eq!(ok.class, JobClass::Batch);
        assert_eq!(ok.deadline_ms, Some(5_000));
        assert_eq!(ok.residency, Some(vec!["EU".to_string()]));
        let bad = validate_line(&lines[1], &ctx).unwrap_err();
        assert_eq!(bad["code"], "invalid_url");
        let mut unknown_model = lines[0].clone();
        unknown_model.body["model"] = json!("nope");
        assert_eq!(
            validate_line(&unknown_model, &ctx).unwrap_err()["code"],
            "model_not_found"
        );
    }
}
