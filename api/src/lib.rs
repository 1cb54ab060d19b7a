//! The HTTP API of the tickets service. It writes tickets and their events through the store in
//! one transaction and never talks to NATS: delivery is the outbox's job.

pub mod auth;
pub mod error;
pub mod extract;
pub mod observe;
pub mod openapi;
pub mod tickets;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use common::store::Tickets;
use std::sync::Arc;

pub use auth::{AuthUser, JwtKey, MaybeAuthUser};
pub use error::ApiError;

/// Largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 16 * 1024;

/// What every handler may use.
#[derive(Clone)]
pub struct ApiContext {
    pub tickets: Arc<dyn Tickets>,
    pub jwt: JwtKey,
}

/// The whole HTTP API, with the contract's 404 and 405 in the error shape.
pub fn router(ctx: ApiContext) -> Router {
    router_with(ctx, Router::new())
}

/// The API plus `extra` routes (health, metrics) under the same request ids, metrics and
/// error shape.
pub fn router_with(ctx: ApiContext, extra: Router) -> Router {
    Router::new()
        .merge(tickets::router())
        .with_state(ctx)
        .merge(extra)
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(observe::observe))
}
