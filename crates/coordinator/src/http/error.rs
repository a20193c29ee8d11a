//! The one place errors become HTTP: a [`RequestError`] becomes OpenAI's error body
//! `{"error": {message, type, param, code}}` with the status code its [`ErrorKind`] names.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub use crate::domain::error::{ErrorKind, RequestError};

/// The status code of an error kind.
pub fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// OpenAI's error body of `e`.
pub fn body(e: &RequestError) -> serde_json::Value {
    json!({"error": {
        "message": e.message,
        "type": e.error_type,
        "param": e.param,
        "code": e.code,
    }})
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let mut response = (status(self.kind), axum::Json(body(&self))).into_response();
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// A handler's result as a response: the value as JSON, or the error's OpenAI body.
pub fn json_or_error(result: Result<impl serde::Serialize, RequestError>) -> Response {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
