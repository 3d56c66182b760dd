//! Request errors, answered with OpenAI's error body (`{"error": {"message", "type", "code"}}`).

use atomic_protocol::{ErrorDetail, ErrorResponse};
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// A request that could not be served: the HTTP status, OpenAI's error `type`, a
/// machine-readable `code` (also the `reason` label of the failure metric) and a message.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request is well-formed but asks for something this model cannot do.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400: the body is not valid JSON.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_json", message)
    }

    /// 422: valid JSON that does not have the request's shape.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// 413: too many inputs, or an input (or the body) too large.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "input_too_large", message)
    }

    /// 404: the request names a model this worker does not serve.
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model `{asked}` is not served here; this worker serves `{served}`"),
        )
    }

    /// 429: the concurrency limit is reached.
    pub fn overloaded(limit: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!("the worker is handling its limit of {limit} concurrent requests; retry later"),
        )
    }

    /// 503: the model is not loaded yet, or the server is shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// 503: the device ran out of memory on the batch holding the request (the worker stays
    /// up; a retry, or fewer or shorter inputs, may fit).
    pub fn out_of_memory(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "out_of_memory",
            format!(
                "{}; the batch holding this request did not fit the device's memory: retry, or send fewer or shorter inputs",
                message.into()
            ),
        )
    }

    /// 500: the model failed on the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// OpenAI's error class for the status.
    pub fn error_type(&self) -> &'static str {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The error body.
    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorDetail {
                message: self.message.clone(),
                error_type: self.error_type().to_owned(),
                code: Some(self.code.to_owned()),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_a_retryable_server_error_that_keeps_its_cause() {
        let e = ApiError::out_of_memory("backend: out of device memory: allocating 1 GiB: out of GPU memory");
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let body = e.body();
        assert_eq!(body.error.code.as_deref(), Some("out_of_memory"));
        assert_eq!(body.error.error_type, "server_error");
        assert!(
            body.error
                .message
                .starts_with("backend: out of device memory: allocating 1 GiB"),
            "{}",
            body.error.message
        );
        assert!(
            body.error.message.contains("fewer or shorter inputs"),
            "{}",
            body.error.message
        );
    }
}
