//! `/api/tickets`: create, list, show and edit tickets. Every write goes through the store,
//! which commits the ticket and its outbox event in one transaction.

use crate::error::{ApiError, ErrorBody, FieldError};
use crate::extract::JsonObject;
use crate::{ApiContext, AuthUser};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use common::store::{Page, UpdateOutcome};
use common::{NewTicket, Price, PriceError, Ticket, TicketChanges, TicketId, Title, TitleError};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;

pub const CREATE_PRICE_MESSAGE: &str = "Price must be greater than 0";
pub const UPDATE_PRICE_MESSAGE: &str = "Price must be provided and must be greater than 0";
pub const LIST_LIMIT_DEFAULT: u32 = 100;
pub const LIST_LIMIT_MAX: u32 = 1000;
/// Header carrying the cursor of the next page of `GET /api/tickets`, when there may be one.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";
/// How often an update re-reads and retries when another update won the race.
const UPDATE_ATTEMPTS: usize = 16;

pub fn router() -> Router<ApiContext> {
    Router::new()
        .route("/api/tickets", get(list).post(create))
        .route("/api/tickets/openapi.json", get(crate::openapi::serve))
        .route("/api/tickets/{id}", get(show).put(update))
}

/// The body of a create or an update: `{title, price}`. Each field is taken as sent, so that a
/// field of the wrong type is reported with the others instead of failing the whole body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct TicketBody {
    /// Not blank; at most 200 characters.
    #[serde(default)]
    #[schema(value_type = String, required = true, min_length = 1, max_length = 200)]
    title: Option<Sent<String>>,
    #[serde(default)]
    #[schema(value_type = PriceInput, required = true)]
    price: Option<Sent<PriceInput>>,
}

/// A field as sent: of the expected type, or anything else (then it is invalid).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Sent<T> {
    Expected(T),
    Other(serde::de::IgnoredAny),
}

/// Greater than 0 and at most 1,000,000: a JSON number, or a numeric string such as "20.00".
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum PriceInput {
    Number(f64),
    Text(String),
}

impl TicketBody {
    fn from_object(body: Map<String, Value>) -> Result<Self, ApiError> {
        serde_json::from_value(Value::Object(body))
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }

    /// The title and the price, or every invalid field at once. `price_message` is the
    /// contract's message for a missing or non-positive price, which differs between create
    /// and update.
    fn parse(self, price_message: &str) -> Result<(Title, Price), ApiError> {
        let title = match self.title {
            Some(Sent::Expected(title)) => Title::parse(&title),
            _ => Err(TitleError::Blank),
        }
        .map_err(|e| FieldError::new("title", e.to_string()));
        let price = match self.price {
            Some(Sent::Expected(PriceInput::Number(n))) => Price::new(n),
            Some(Sent::Expected(PriceInput::Text(text))) => Price::parse(&text),
            _ => Err(PriceError::NotPositive),
        }
        .map_err(|e| match e {
            PriceError::NotPositive => FieldError::new("price", price_message),
            other => FieldError::new("price", other.to_string()),
        });
        match (title, price) {
            (Ok(t), Ok(p)) => Ok((t, p)),
            (t, p) => Err(ApiError::Validation(
                [t.err(), p.err()].into_iter().flatten().collect(),
            )),
        }
    }
}

#[utoipa::path(
    post, path = "/api/tickets", tag = "tickets",
    request_body(content = TicketBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Created, version 0; its ticket.created event is in the outbox", body = Ticket),
        (status = 400, description = "Invalid body: every invalid field is listed", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 503, description = "The store failed; nothing was written", body = ErrorBody),
    ),
    security(("session" = []), ("bearer" = []))
)]
pub(crate) async fn create(
    State(ctx): State<ApiContext>,
    AuthUser(user_id): AuthUser,
    JsonObject(body): JsonObject,
) -> Result<impl IntoResponse, ApiError> {
    let (title, price) = TicketBody::from_object(body)?.parse(CREATE_PRICE_MESSAGE)?;
    let ticket = ctx
        .tickets
        .create_ticket(&NewTicket {
            title,
            price,
            user_id,
        })
        .await?;
    tracing::info!(ticket.id = %ticket.id, "ticket created");
    Ok((StatusCode::CREATED, Json(ticket)))
}

#[utoipa::path(
    get, path = "/api/tickets", tag = "tickets",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Page size, default 100"),
        ("cursor" = Option<String>, Query, description = "The x-next-cursor of the previous page"),
    ),
    responses(
        (status = 200, description = "Unreserved tickets, oldest first", body = Vec<Ticket>,
         headers(("x-next-cursor" = String, description = "Present when the page is full: the cursor of the next page"))),
        (status = 400, description = "Invalid limit or cursor", body = ErrorBody),
        (status = 503, description = "The store failed", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(ctx): State<ApiContext>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = match params.get("limit") {
        None => LIST_LIMIT_DEFAULT,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=LIST_LIMIT_MAX).contains(n))
            .ok_or_else(|| ApiError::BadRequest {
                message: format!("limit must be an integer from 1 to {LIST_LIMIT_MAX}"),
                field: Some("limit"),
            })?,
    };
    let after = match params.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(raw) => Some(TicketId::parse(raw).ok_or_else(|| ApiError::BadRequest {
            message: "cursor must be a ticket id from a previous page".into(),
            field: Some("cursor"),
        })?),
    };
    let tickets = ctx.tickets.list_unreserved(Page { limit, after }).await?;
    let mut headers = HeaderMap::new();
    if tickets.len() == limit as usize
        && let Some(last) = tickets.last()
        && let Ok(v) = HeaderValue::from_str(&last.id.to_hex())
    {
        headers.insert(NEXT_CURSOR_HEADER, v);
    }
    Ok((headers, Json(tickets)))
}

#[utoipa::path(
    get, path = "/api/tickets/{id}", tag = "tickets",
    params(("id" = String, Path, description = "Ticket id")),
    responses(
        (status = 200, description = "The ticket", body = Ticket),
        (status = 404, description = "No such ticket (or not an ObjectId)", body = ErrorBody),
        (status = 503, description = "The store failed", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(ctx): State<ApiContext>,
    Path(id): Path<String>,
) -> Result<Json<Ticket>, ApiError> {
    let id = TicketId::parse(&id).ok_or(ApiError::NotFound)?;
    ctx.tickets
        .get_ticket(id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound)
}

/// Checks in the contract's order: signed in (extractor), body, exists, not reserved, owner.
/// The write applies only to the version read; when another update got there first, re-read and
/// re-check, so every version has exactly one event and no update is lost silently.
#[utoipa::path(
    put, path = "/api/tickets/{id}", tag = "tickets",
    params(("id" = String, Path, description = "Ticket id")),
    request_body(content = TicketBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Updated, version + 1; its ticket.updated event is in the outbox", body = Ticket),
        (status = 400, description = "Invalid body, or the ticket is reserved", body = ErrorBody),
        (status = 401, description = "Not signed in, or not the owner", body = ErrorBody),
        (status = 404, description = "No such ticket", body = ErrorBody),
        (status = 409, description = "Lost the race against other updates 16 times", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 503, description = "The store failed; nothing was written", body = ErrorBody),
    ),
    security(("session" = []), ("bearer" = []))
)]
pub(crate) async fn update(
    State(ctx): State<ApiContext>,
    AuthUser(user_id): AuthUser,
    Path(id): Path<String>,
    JsonObject(body): JsonObject,
) -> Result<Json<Ticket>, ApiError> {
    let (title, price) = TicketBody::from_object(body)?.parse(UPDATE_PRICE_MESSAGE)?;
    let changes = TicketChanges { title, price };
    let id = TicketId::parse(&id).ok_or(ApiError::NotFound)?;
    for _ in 0..UPDATE_ATTEMPTS {
        let current = ctx
            .tickets
            .get_ticket(id)
            .await?
            .ok_or(ApiError::NotFound)?;
        if current.order_id.is_some() {
            return Err(ApiError::bad_request("Cannot edit a reserved ticket"));
        }
        if current.user_id != user_id.as_str() {
            return Err(ApiError::Unauthorized);
        }
        match ctx
            .tickets
            .update_ticket(id, current.version, &changes)
            .await?
        {
            UpdateOutcome::Updated(ticket) => {
                tracing::info!(ticket.id = %ticket.id, version = ticket.version, "ticket updated");
                return Ok(Json(ticket));
            }
            UpdateOutcome::NotFound => return Err(ApiError::NotFound),
            UpdateOutcome::Conflict => continue,
        }
    }
    Err(ApiError::Conflict(
        "The ticket is being changed by others right now, try again".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JwtKey, router};
    use axum::body::Body;
    use axum::http::{Request, header};
    use common::store::SqliteStore;
    use std::sync::Arc;
    use tower::ServiceExt;

    async fn app() -> (Router, JwtKey, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tmp");
        let store = SqliteStore::open(dir.path().join("t.db"), Default::default())
            .await
            .expect("open");
        let jwt = JwtKey::new("k");
        let ctx = ApiContext {
            tickets: Arc::new(store),
            jwt: jwt.clone(),
        };
        (router(ctx), jwt, dir)
    }

    async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
        let res = app.clone().oneshot(req).await.expect("response");
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn post(jwt: Option<&str>, content_type: &str, body: &str) -> Request<Body> {
        let mut b = Request::post("/api/tickets").header(header::CONTENT_TYPE, content_type);
        if let Some(jwt) = jwt {
            b = b.header(header::AUTHORIZATION, format!("Bearer {jwt}"));
        }
        b.body(Body::from(body.to_owned())).expect("request")
    }

    #[tokio::test]
    async fn create_then_show() {
        let (app, jwt, _dir) = app().await;
        let token = jwt.sign("u1", "e").expect("sign");
        let (status, body) = call(
            &app,
            post(
                Some(&token),
                "application/json",
                r#"{"title":"t","price":"20.00"}"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(body["price"], serde_json::json!(20.0));
        assert_eq!(body["version"], 0);
        let id = body["id"].as_str().expect("id");
        let (status, shown) = call(
            &app,
            Request::get(format!("/api/tickets/{id}"))
                .body(Body::empty())
                .expect("r"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(shown, body);
    }

    #[tokio::test]
    async fn rejections_use_the_error_shape() {
        let (app, jwt, _dir) = app().await;
        let token = jwt.sign("u1", "e").expect("sign");
        let cases = [
            (
                post(None, "application/json", "{}"),
                StatusCode::UNAUTHORIZED,
            ),
            (
                post(Some(&token), "text/plain", "{}"),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                post(Some(&token), "application/json", "{not json"),
                StatusCode::BAD_REQUEST,
            ),
            (
                post(Some(&token), "application/json", "[1]"),
                StatusCode::BAD_REQUEST,
            ),
            (
                post(
                    Some(&token),
                    "application/json",
                    &format!(r#"{{"title":"{}","price":1}}"#, "x".repeat(20_000)),
                ),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                Request::get("/nope").body(Body::empty()).expect("r"),
                StatusCode::NOT_FOUND,
            ),
            (
                Request::delete("/api/tickets")
                    .body(Body::empty())
                    .expect("r"),
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (
                Request::get("/api/tickets?limit=0")
                    .body(Body::empty())
                    .expect("r"),
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (req, want) in cases {
            let what = format!("{} {}", req.method(), req.uri());
            let (status, body) = call(&app, req).await;
            assert_eq!(status, want, "{what}");
            let message = body["errors"][0]["message"].as_str();
            assert!(message.is_some_and(|m| !m.is_empty()), "{what}: {body}");
        }
    }
}
