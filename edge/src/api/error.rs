//! API errors: every failure is JSON `{"error": code, "message": sentence, ...}` with a stable
//! snake_case code and the status the contract gives it.

use std::sync::Arc;

use super::Out;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value as Json, json};
use shared::Row;
use shared::json::{FieldError, row_to_json};

use crate::store::{Refusal, StoreError, TxnError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra members: `current` (a conflict's row), `op_index` (a batch's failing op).
    pub extra: Map<String, Json>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// This error as a [`Refusal`] the store reports when it reaches the refused operation.
    /// Extra members are not carried: a refusal made before the store has none.
    pub fn into_refusal(self) -> Refusal {
        debug_assert!(self.extra.is_empty(), "extra members would be lost");
        Refusal {
            status: self.status.as_u16(),
            code: self.code,
            message: self.message,
        }
    }

    pub fn with(mut self, key: &str, value: Json) -> ApiError {
        self.extra.insert(key.into(), value);
        self
    }

    /// The status and code of a store error.
    pub fn status_of(e: &StoreError) -> StatusCode {
        match e {
            StoreError::UnknownTable(_) | StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::Field(_)
            | StoreError::UnknownOrder { .. }
            | StoreError::EmptyTransaction => StatusCode::BAD_REQUEST,
            StoreError::VersionConflict { .. }
            | StoreError::IdConflict { .. }
            | StoreError::OrderClosed { .. }
            | StoreError::OrderNotEmpty { .. }
            | StoreError::Unpaid { .. }
            | StoreError::IllegalTransition { .. }
            | StoreError::AmountOverflow { .. } => StatusCode::CONFLICT,
            StoreError::HubOwned(_) | StoreError::ServerWritten(_) => StatusCode::FORBIDDEN,
            StoreError::LogImmutable(_) | StoreError::SharedDelete(_) => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            StoreError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            StoreError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            StoreError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Refused(r) => {
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }
}

fn current_json(row: &Arc<Row>) -> Json {
    Json::Object(row_to_json(row))
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let status = ApiError::status_of(&e);
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("request failed in storage: {e}");
        }
        let mut err = ApiError::new(status, e.code(), e.to_string());
        if let StoreError::VersionConflict { current, .. } = &e {
            err = err.with("current", current_json(current));
        }
        err
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> ApiError {
        StoreError::Field(e).into()
    }
}

impl From<TxnError> for ApiError {
    fn from(e: TxnError) -> ApiError {
        ApiError::from(e.error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::with_capacity(2 + self.extra.len());
        body.insert("error".into(), json!(self.code));
        body.insert("message".into(), json!(self.message));
        body.extend(self.extra);
        (self.status, Out(Json::Object(body))).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
