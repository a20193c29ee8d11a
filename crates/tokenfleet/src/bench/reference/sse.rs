//! OpenAI chat-completions event streams: splitting bytes into SSE lines and classifying
//! each line (ignored, `[DONE]`, or a chunk with content, usage, finish reason or error).

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::truncate;

/// What one SSE line means for the driver.
#[derive(Debug, PartialEq)]
pub(super) enum SseEvent {
    /// Blank lines, comments (`:`), `event:`/`id:`/`retry:` fields.
    Ignore,
    /// `data: [DONE]`.
    Done,
    Chunk(ChunkInfo),
}

#[derive(Debug, Default, PartialEq)]
pub(super) struct ChunkInfo {
    /// A non-empty `delta.content` (or `delta.reasoning_content`: for a reasoning model that
    /// is the first generated text, so it is what the user waits for).
    pub(super) has_content: bool,
    /// `usage.completion_tokens`, normally on the final chunk.
    pub(super) completion_tokens: Option<u64>,
    pub(super) finish_reason: bool,
    /// An `error` object in place of a chunk.
    pub(super) error: Option<String>,
}

/// Parses one SSE line of an OpenAI chat-completions stream. OpenAI-style servers put each
/// event in one `data:` line, so multi-line data fields are not joined.
pub(super) fn parse_sse_line(line: &str) -> Result<SseEvent> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let Some(payload) = line.strip_prefix("data:") else {
        return Ok(SseEvent::Ignore);
    };
    let payload = payload.trim();
    if payload == "[DONE]" {
        return Ok(SseEvent::Done);
    }
    if payload.is_empty() {
        return Ok(SseEvent::Ignore);
    }
    let v: Value = serde_json::from_str(payload)
        .with_context(|| format!("SSE data is not JSON: {}", truncate(payload, 200)))?;
    let mut info = ChunkInfo::default();
    if let Some(e) = v.get("error") {
        info.error = Some(e.to_string());
        return Ok(SseEvent::Chunk(info));
    }
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        for choice in choices {
            let delta = choice.get("delta");
            let non_empty = |key: &str| {
                delta
                    .and_then(|d| d.get(key))
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
            };
            info.has_content |= non_empty("content") || non_empty("reasoning_content");
            info.finish_reason |= choice.get("finish_reason").is_some_and(|f| !f.is_null());
        }
    }
    info.completion_tokens = v
        .get("usage")
        .and_then(|u| u.get("completion_tokens"))
        .and_then(Value::as_u64);
    Ok(SseEvent::Chunk(info))
}

/// Splits a byte stream into lines. Works on bytes so that a UTF-8 character split across
/// two network chunks is joined before decoding.
#[derive(Debug, Default)]
pub(super) struct SseLineBuffer {
    pending: Vec<u8>,
}

/// A single SSE line longer than this means the peer is not an OpenAI stream.
const MAX_SSE_LINE: usize = 4 << 20;

impl SseLineBuffer {
    pub(super) fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>> {
        self.pending.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
            let rest = self.pending.split_off(i + 1);
            let mut line = std::mem::replace(&mut self.pending, rest);
            line.pop(); // the '\n'
            lines.push(String::from_utf8(line).context("SSE line is not UTF-8")?);
        }
        if self.pending.len() > MAX_SSE_LINE {
            bail!("SSE line longer than {MAX_SSE_LINE} bytes");
        }
        Ok(lines)
    }

    /// The unterminated remainder, if any.
    pub(super) fn finish(&mut self) -> Result<Option<String>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let line = std::mem::take(&mut self.pending);
        Ok(Some(
            String::from_utf8(line).context("SSE line is not UTF-8")?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_are_classified() {
        assert_eq!(parse_sse_line("").unwrap(), SseEvent::Ignore);
        assert_eq!(parse_sse_line(": keep-alive").unwrap(), SseEvent::Ignore);
        assert_eq!(parse_sse_line("event: message").unwrap(), SseEvent::Ignore);
        assert_eq!(parse_sse_line("data: [DONE]").unwrap(), SseEvent::Done);
        assert_eq!(parse_sse_line("data:[DONE]\r").unwrap(), SseEvent::Done);

        // The role-only first chunk carries no content.
        let role = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null},"finish_reason":null}],"object":"chat.completion.chunk"}"#;
        assert_eq!(
            parse_sse_line(role).unwrap(),
            SseEvent::Chunk(ChunkInfo::default())
        );

        let content =
            r#"data: {"choices":[{"index":0,"delta":{"content":"Once"},"finish_reason":null}]}"#;
        let SseEvent::Chunk(c) = parse_sse_line(content).unwrap() else {
            panic!()
        };
        assert!(c.has_content && !c.finish_reason && c.completion_tokens.is_none());

        let reasoning = r#"data: {"choices":[{"delta":{"reasoning_content":"Hmm"}}]}"#;
        let SseEvent::Chunk(c) = parse_sse_line(reasoning).unwrap() else {
            panic!()
        };
        assert!(c.has_content);

        let last = r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":{"completion_tokens":128,"prompt_tokens":37,"total_tokens":165}}"#;
        let SseEvent::Chunk(c) = parse_sse_line(last).unwrap() else {
            panic!()
        };
        assert!(!c.has_content && c.finish_reason);
        assert_eq!(c.completion_tokens, Some(128));

        let usage_only = r#"data: {"choices":[],"usage":{"completion_tokens":7}}"#;
        let SseEvent::Chunk(c) = parse_sse_line(usage_only).unwrap() else {
            panic!()
        };
        assert_eq!(c.completion_tokens, Some(7));

        let err = r#"data: {"error":{"code":500,"message":"boom"}}"#;
        let SseEvent::Chunk(c) = parse_sse_line(err).unwrap() else {
            panic!()
        };
        assert!(c.error.unwrap().contains("boom"));

        assert!(parse_sse_line("data: {not json").is_err());
    }

    #[test]
    fn line_buffer_joins_split_chunks_and_utf8() {
        let mut b = SseLineBuffer::default();
        let text = "data: {\"x\":\"é\"}\r\n\r\ndata: [DONE]\n";
        let bytes = text.as_bytes();
        // Split inside the two-byte 'é'.
        let cut = text.find('é').unwrap() + 1;
        let mut lines = b.push(&bytes[..cut]).unwrap();
        assert!(lines.is_empty());
        lines.extend(b.push(&bytes[cut..]).unwrap());
        assert_eq!(lines, vec!["data: {\"x\":\"é\"}\r", "\r", "data: [DONE]"]);
        assert_eq!(b.finish().unwrap(), None);
        b.push(b"data: [DONE]").unwrap();
        assert_eq!(b.finish().unwrap().as_deref(), Some("data: [DONE]"));
    }
}
