//! The OpenAPI 3 document of the HTTP API, generated from the handlers' annotations and the
//! types' schemas, served at `GET /api/tickets/openapi.json`.

use crate::error::{ErrorBody, ErrorItem};
use crate::tickets;
use axum::Json;
use axum::response::IntoResponse;
use common::Ticket;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tickets API",
        description = "Tickets of the ticketing platform. Every change is also published to NATS \
                       JetStream (ticket.created / ticket.updated) through a transactional outbox.",
    ),
    paths(tickets::create, tickets::list, tickets::show, tickets::update),
    components(schemas(Ticket, tickets::TicketBody, tickets::PriceInput, ErrorBody, ErrorItem)),
    modifiers(&Security),
    tags((name = "tickets", description = "Create, list, show and edit tickets"))
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "session",
                "cookie-session cookie: base64 of {\"jwt\":\"<HS256 JWT>\"} (also `express:sess`)",
            ))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

pub async fn serve() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}
