//! The Batch API's input file: `parse_input` checks the JSONL shape on upload, `validate_line`
//! turns each line into a job's request or an error-file entry when the batch starts. Neither
//! panics; what they return holds what the batch runner relies on.
#![no_main]

use std::collections::HashSet;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tokenfleet_coordinator::fuzzing::{parse_input, validate_line, BatchContext, ENDPOINTS};
use tokenfleet_coordinator::CoordinatorConfig;
use tokenfleet_scheduler::JobClass;

static CONFIG: LazyLock<CoordinatorConfig> = LazyLock::new(CoordinatorConfig::default);

/// A small per-batch limit, so the fuzzer reaches the "too many requests" path.
const MAX_REQUESTS: usize = 8;
const DEADLINE_MS: u64 = 1_750_000_000_000;

fuzz_target!(|data: &[u8]| {
    let config = &*CONFIG;
    let lines = match parse_input(data, MAX_REQUESTS) {
        Ok(lines) => lines,
        Err(e) => {
            assert!(e.status.is_client_error() && e.code.is_some(), "{e:?}");
            return;
        }
    };
    assert!(!lines.is_empty() && lines.len() <= MAX_REQUESTS);
    let ids: HashSet<&str> = lines.iter().map(|l| l.custom_id.as_str()).collect();
    assert_eq!(ids.len(), lines.len(), "custom_ids are unique");
    assert!(lines.windows(2).all(|w| w[0].line < w[1].line));
    let has_model = |m: &str| m != "missing";
    let residency = (data.len() % 2 == 0).then(|| vec!["EU".to_string()]);
    for endpoint in ENDPOINTS {
        let ctx = BatchContext {
            endpoint,
            deadline_ms: DEADLINE_MS,
            residency: residency.clone(),
            config,
            has_model: &has_model,
        };
        for line in &lines {
            match validate_line(line, &ctx) {
                Ok(r) => {
                    assert_eq!(line.url, endpoint);
                    assert_eq!(r.class, JobClass::Batch);
                    assert!(!r.stream);
                    assert!(r.deadline_ms.is_some_and(|d| d <= DEADLINE_MS));
                    if residency.is_some() {
                        assert_eq!(r.residency, residency);
                    }
                    assert!(r.max_tokens >= 1 && r.max_tokens <= config.max_tokens_limit);
                }
                Err(entry) => {
                    assert!(entry["code"].is_string(), "{entry}");
                    assert!(entry["message"].is_string(), "{entry}");
                }
            }
        }
    }
});
