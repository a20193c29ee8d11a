//! The errors a request can meet inside the coordinator, in the terms a client is told (OpenAI's
//! error `type`, `param` and `code`), without a transport: the HTTP edge maps [`ErrorKind`] to a
//! status code and the body (`crate::http::error`).

/// What kind of failure a [`RequestError`] is; the edge picks its status code from this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or asks for what cannot be done (400).
    InvalidRequest,
    /// No or an unknown API key (401).
    Unauthorized,
    /// No such model, file, batch or route (404).
    NotFound,
    /// The client did not send its body in time (408).
    RequestTimeout,
    /// The body is over the configured limit (413).
    PayloadTooLarge,
    /// The object is not in a state that allows this (409: cancelling a finished batch).
    Conflict,
    /// A well-formed request that conflicts with an earlier one (422).
    Unprocessable,
    /// A rate limit, a quota or a full queue (429, with a wait when one is known).
    TooManyRequests,
    /// The fleet or the store cannot serve now; retrying later may work (503).
    Unavailable,
    /// A fault of the coordinator (500).
    Internal,
}

/// An error an API client caused or must hear about.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// What went wrong, as the edge reports it (HTTP status, gRPC code).
    pub kind: ErrorKind,
    pub message: String,
    /// OpenAI's error `type` (`invalid_request_error`, `rate_limit_error`, `requests`, ...).
    pub error_type: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Sent as `Retry-After` (whole seconds, rounded up) with a 429.
    pub retry_after: Option<std::time::Duration>,
}

impl RequestError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            kind: ErrorKind::InvalidRequest,
            message: message.into(),
            error_type: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Unauthorized,
            message: message.into(),
            error_type: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            kind: ErrorKind::NotFound,
            message: format!(
                "The model `{model}` does not exist or no enrolled vehicle serves it."
            ),
            error_type: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    /// An `Idempotency-Key` sent again with a different request body (422, as payment APIs
    /// and the IETF Idempotency-Key draft answer).
    pub fn idempotency_key_reused() -> Self {
        Self {
            kind: ErrorKind::Unprocessable,
            message: "This Idempotency-Key was already used with a different request body. Use a new key for a new request.".into(),
            error_type: "invalid_request_error",
            param: Some("Idempotency-Key".into()),
            code: Some("idempotency_key_reused"),
            retry_after: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::NotFound,
            message: message.into(),
            error_type: "invalid_request_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::TooManyRequests,
            message: message.into(),
            error_type: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: None,
        }
    }

    /// A tenant's rate limit, in OpenAI's shape (`type` is `requests` or `tokens`).
    pub fn rate_limited(
        message: impl Into<String>,
        limit: &'static str,
        retry_after: std::time::Duration,
    ) -> Self {
        Self {
            kind: ErrorKind::TooManyRequests,
            message: message.into(),
            error_type: limit,
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: (!retry_after.is_zero()).then_some(retry_after),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Unavailable,
            message: message.into(),
            error_type: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Internal,
            message: message.into(),
            error_type: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }
}

impl From<tokenfleet_store::StoreError> for RequestError {
    fn from(e: tokenfleet_store::StoreError) -> Self {
        tracing::error!(cause = %e, "job store failure");
        RequestError::unavailable(
            "the job store is unavailable; retry with the same Idempotency-Key",
        )
    }
}
