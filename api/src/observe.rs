//! Per-request observability: a request id (taken from `x-request-id` or generated, echoed back)
//! on a tracing span around the request, and Prometheus metrics by route and status.

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use std::time::Instant;
use tracing::Instrument;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

fn usable_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| s.to_owned())
}

pub async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    // Label by route template, never by raw path, so ids do not explode the label set.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(usable_request_id)
        .unwrap_or_else(|| common::EventId::new().to_hex());
    let span = tracing::info_span!("request", %method, %route, %request_id);
    let mut res = next.run(req).instrument(span.clone()).await;
    let status = res.status().as_u16().to_string();
    let elapsed = started.elapsed().as_secs_f64();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels).record(elapsed);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    span.in_scope(|| {
        tracing::debug!(
            status = res.status().as_u16(),
            latency_ms = elapsed * 1000.0,
            "request done"
        )
    });
    res
}
