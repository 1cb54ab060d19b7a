//! One error type for every handler, mapped to a status code and the course's error shape
//! `{"errors":[{"message":..,"field":..}]}` in one place.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::StoreError;
use serde::Serialize;

/// A body field that broke a rule, with the message the HTTP contract pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request validation failed")]
    Validation(Vec<FieldError>),
    #[error("{message}")]
    BadRequest {
        message: String,
        field: Option<&'static str>,
    },
    #[error("Not authorized")]
    Unauthorized,
    #[error("Not Found")]
    NotFound,
    #[error("Method Not Allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("Request body is larger than {} bytes", crate::BODY_LIMIT)]
    PayloadTooLarge,
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("The service is temporarily unavailable, try again")]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            field: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) | ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Every error answer: `{"errors":[{"message":..,"field":..}]}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub errors: Vec<ErrorItem>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorItem {
    pub message: String,
    /// The body field at fault, only for body fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, nullable = false)]
    pub field: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let errors = match &self {
            ApiError::Validation(list) => list
                .iter()
                .map(|v| ErrorItem {
                    message: v.message.clone(),
                    field: Some(v.field),
                })
                .collect(),
            ApiError::BadRequest { message, field } => vec![ErrorItem {
                message: message.clone(),
                field: *field,
            }],
            other => {
                if let ApiError::Store(e) = other {
                    tracing::error!(error = %common::error_chain(e), "store failure answered with 503");
                }
                vec![ErrorItem {
                    message: other.to_string(),
                    field: None,
                }]
            }
        };
        (self.status(), Json(ErrorBody { errors })).into_response()
    }
}
