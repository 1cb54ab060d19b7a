//! The HTTP contract of the tickets API, over real HTTP on port 0 and a real SQLite file.

mod support;

use futures::future::join_all;
use serde_json::{Value, json};
use support::{errors, session_cookie, spawn_app, token};

const CREATE_PRICE: &str = "Price must be greater than 0";
const UPDATE_PRICE: &str = "Price must be provided and must be greater than 0";

#[tokio::test]
async fn create_returns_201_and_writes_ticket_and_event_together() {
    let app = spawn_app().await;
    let ticket = app.create_ok("user-1", "concert", 20.0).await;
    assert_eq!(ticket["title"], "concert");
    assert_eq!(ticket["price"], json!(20.0));
    assert_eq!(ticket["userId"], "user-1");
    assert_eq!(ticket["version"], 0);
    assert!(ticket.get("orderId").is_none());
    let id = ticket["id"].as_str().expect("id");
    assert_eq!(id.len(), 24);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));

    let db = app.db();
    let (subject, data, aggregate, version, locked, failures, attempts): (
        String,
        String,
        String,
        i64,
        bool,
        String,
        i64,
    ) = db
        .query_row(
            "SELECT subject, data, aggregate_id, version, is_locked, failures, attempts FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .expect("one event");
    assert_eq!(subject, "ticket.created");
    let data: Value = serde_json::from_str(&data).expect("json");
    assert_eq!(data, ticket, "the payload is the stored ticket");
    assert_eq!((aggregate.as_str(), version), (id, 0));
    assert!(locked);
    assert_eq!((failures.as_str(), attempts), ("[]", 0));
}

#[tokio::test]
async fn price_as_numeric_string_is_stored_as_number() {
    let app = spawn_app().await;
    let res = app
        .create("u", json!({"title": "t", "price": "20.00"}))
        .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["price"], json!(20.0));
    let stored: f64 = app
        .db()
        .query_row("SELECT price FROM tickets", [], |r| r.get(0))
        .expect("row");
    assert_eq!(stored, 20.0);
}

#[tokio::test]
async fn create_validates_title_and_price_with_the_contract_messages() {
    let app = spawn_app().await;
    let cases = [
        (json!({"price": 10}), vec![("Title is required", "title")]),
        (
            json!({"title": "", "price": 10}),
            vec![("Title is required", "title")],
        ),
        (
            json!({"title": "   ", "price": 10}),
            vec![("Title is required", "title")],
        ),
        (json!({"title": "t"}), vec![(CREATE_PRICE, "price")]),
        (
            json!({"title": "t", "price": -10}),
            vec![(CREATE_PRICE, "price")],
        ),
        (
            json!({"title": "t", "price": 0}),
            vec![(CREATE_PRICE, "price")],
        ),
        (
            json!({"title": "t", "price": "abc"}),
            vec![(CREATE_PRICE, "price")],
        ),
        (
            json!({"title": "t", "price": "NaN"}),
            vec![(CREATE_PRICE, "price")],
        ),
        (
            json!({}),
            vec![("Title is required", "title"), (CREATE_PRICE, "price")],
        ),
    ];
    for (body, want) in cases {
        let errs = errors(app.create("u", body.clone()).await, 400).await;
        let got: Vec<(String, String)> = errs
            .iter()
            .map(|e| {
                (
                    e["message"].as_str().unwrap_or_default().to_owned(),
                    e["field"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = want
            .into_iter()
            .map(|(m, f)| (m.to_owned(), f.to_owned()))
            .collect();
        assert_eq!(got, want, "{body}");
    }
    // Bounds are documented and enforced.
    let long = "x".repeat(201);
    errors(
        app.create("u", json!({"title": long, "price": 1})).await,
        400,
    )
    .await;
    errors(
        app.create("u", json!({"title": "t", "price": 1_000_001}))
            .await,
        400,
    )
    .await;
    assert_eq!((app.count("tickets"), app.count("events")), (0, 0));
}

#[tokio::test]
async fn not_signed_in_is_401_on_writes_and_public_routes_still_serve() {
    let app = spawn_app().await;
    let ticket = app.create_ok("owner", "t", 5.0).await;
    let id = ticket["id"].as_str().expect("id");
    let none_alg = format!(
        "{}.{}.",
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJpZCI6Im93bmVyIiwiZW1haWwiOiJlIn0"
    );
    let forged = api::JwtKey::new("another-key")
        .sign("owner", "e")
        .expect("sign");
    let bad_auth: Vec<(&str, String)> = vec![
        ("cookie", "session=garbage".into()),
        ("cookie", "session=eyJqd3QiOiJ4In0=".into()), // {"jwt":"x"}
        ("authorization", format!("Bearer {none_alg}")),
        ("authorization", format!("Bearer {forged}")),
    ];
    let mut requests = vec![
        app.client.post(app.url("/api/tickets")),
        app.client.put(app.url(&format!("/api/tickets/{id}"))),
    ];
    for (name, value) in &bad_auth {
        requests.push(
            app.client
                .post(app.url("/api/tickets"))
                .header(*name, value),
        );
        requests.push(
            app.client
                .put(app.url(&format!("/api/tickets/{id}")))
                .header(*name, value),
        );
    }
    for req in requests {
        let res = req
            .json(&json!({"title": "t", "price": 1}))
            .send()
            .await
            .expect("request");
        let errs = errors(res, 401).await;
        assert_eq!(errs[0]["message"], "Not authorized");
        assert!(errs[0].get("field").is_none());
    }
    for (name, value) in &bad_auth {
        let res = app
            .client
            .get(app.url(&format!("/api/tickets/{id}")))
            .header(*name, value)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 200, "public route with a bad {name}");
    }
    assert_eq!(app.count("tickets"), 1);
}

#[tokio::test]
async fn older_cookie_name_and_bearer_header_sign_in() {
    let app = spawn_app().await;
    let cookie = session_cookie("u").replace("session=", "express:sess=");
    let res = app
        .client
        .post(app.url("/api/tickets"))
        .header("cookie", cookie)
        .json(&json!({"title": "t", "price": 1}))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 201);
    let res = app
        .client
        .post(app.url("/api/tickets"))
        .bearer_auth(token("u"))
        .json(&json!({"title": "t", "price": 1}))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 201);
}

#[tokio::test]
async fn show_returns_the_ticket_or_404() {
    let app = spawn_app().await;
    let ticket = app.create_ok("u", "t", 5.0).await;
    let id = ticket["id"].as_str().expect("id");
    let res = app
        .client
        .get(app.url(&format!("/api/tickets/{id}")))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.expect("json"), ticket);
    for missing in ["6b05e895348e53823c07c7f4", "not-an-object-id", "123"] {
        let res = app
            .client
            .get(app.url(&format!("/api/tickets/{missing}")))
            .send()
            .await
            .expect("request");
        let errs = errors(res, 404).await;
        assert_eq!(errs[0]["message"], "Not Found");
    }
    let res = app
        .client
        .get(app.url("/api/nothing-here"))
        .send()
        .await
        .expect("request");
    assert_eq!(errors(res, 404).await[0]["message"], "Not Found");
}

#[tokio::test]
async fn list_shows_unreserved_tickets_with_paging() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let t = app.create_ok("u", &format!("t{i}"), 1.0).await;
        ids.push(t["id"].as_str().expect("id").to_owned());
    }
    // Reserve one ticket the way the order listener will: an orderId on the row.
    app.db()
        .execute(
            "UPDATE tickets SET order_id = 'order-1' WHERE id = ?1",
            [&ids[2]],
        )
        .expect("reserve");
    let all: Vec<Value> = app
        .client
        .get(app.url("/api/tickets"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let listed: Vec<&str> = all.iter().filter_map(|t| t["id"].as_str()).collect();
    assert_eq!(listed, [&ids[0], &ids[1], &ids[3], &ids[4]]);

    // Paging: limit and the cursor of the next page in a header; the body stays an array.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = app.url("/api/tickets?limit=2");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let res = app.client.get(url).send().await.expect("request");
        assert_eq!(res.status(), 200);
        let next = res
            .headers()
            .get("x-next-cursor")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let page: Vec<Value> = res.json().await.expect("json");
        seen.extend(
            page.iter()
                .filter_map(|t| t["id"].as_str().map(str::to_owned)),
        );
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, listed);
    for bad in ["limit=0", "limit=1001", "limit=abc", "cursor=zzz"] {
        let res = app
            .client
            .get(app.url(&format!("/api/tickets?{bad}")))
            .send()
            .await
            .expect("request");
        errors(res, 400).await;
    }
}

#[tokio::test]
async fn update_applies_the_checks_in_the_contract_order() {
    let app = spawn_app().await;
    let ticket = app.create_ok("owner", "t", 5.0).await;
    let id = ticket["id"].as_str().expect("id").to_owned();
    let missing = "6b05e895348e53823c07c7f4";

    // Invalid body comes before "no such ticket".
    let errs = errors(
        app.update("owner", missing, json!({"title": "", "price": 1}))
            .await,
        400,
    )
    .await;
    assert_eq!(errs[0]["message"], "Title is required");
    let errs = errors(app.update("owner", &id, json!({"title": "x"})).await, 400).await;
    assert_eq!(errs[0]["message"], UPDATE_PRICE);
    assert_eq!(errs[0]["field"], "price");
    let errs = errors(
        app.update("owner", &id, json!({"title": "x", "price": -1}))
            .await,
        400,
    )
    .await;
    assert_eq!(errs[0]["message"], UPDATE_PRICE);

    // No such ticket: 404, also for an id that is not an ObjectId.
    errors(
        app.update("owner", missing, json!({"title": "x", "price": 1}))
            .await,
        404,
    )
    .await;
    errors(
        app.update("owner", "nope", json!({"title": "x", "price": 1}))
            .await,
        404,
    )
    .await;

    // Not the owner: 401.
    let errs = errors(
        app.update("intruder", &id, json!({"title": "x", "price": 1}))
            .await,
        401,
    )
    .await;
    assert_eq!(errs[0]["message"], "Not authorized");

    // The owner: 200 with the stored ticket, version + 1, and its event.
    let res = app
        .update("owner", &id, json!({"title": "new", "price": "7.50"}))
        .await;
    assert_eq!(res.status(), 200);
    let updated: Value = res.json().await.expect("json");
    assert_eq!(updated["title"], "new");
    assert_eq!(updated["price"], json!(7.5));
    assert_eq!(updated["version"], 1);
    let (subject, data): (String, String) = app
        .db()
        .query_row(
            "SELECT subject, data FROM events WHERE version = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("event");
    assert_eq!(subject, "ticket.updated");
    assert_eq!(serde_json::from_str::<Value>(&data).expect("json"), updated);

    // Reserved: 400 before the ownership check.
    app.db()
        .execute("UPDATE tickets SET order_id = 'o1' WHERE id = ?1", [&id])
        .expect("reserve");
    for user in ["owner", "intruder"] {
        let errs = errors(
            app.update(user, &id, json!({"title": "x", "price": 1}))
                .await,
            400,
        )
        .await;
        assert_eq!(errs[0]["message"], "Cannot edit a reserved ticket");
    }
    assert_eq!(
        app.count("events"),
        2,
        "only the successful update wrote an event"
    );
}

#[tokio::test]
async fn bad_bodies_get_4xx_in_the_error_shape_and_write_nothing() {
    let app = spawn_app().await;
    let ticket = app.create_ok("u", "t", 5.0).await;
    let id = ticket["id"].as_str().expect("id");
    let big = format!(r#"{{"title":"{}","price":1}}"#, "x".repeat(17 * 1024));
    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("application/json", "POST", "{not json".into(), 400),
        ("application/json", "POST", "[1,2]".into(), 400),
        ("application/json", "POST", "".into(), 400),
        (
            "text/plain",
            "POST",
            r#"{"title":"t","price":1}"#.into(),
            415,
        ),
        ("application/json", "POST", big.clone(), 413),
        ("application/json", "PUT", "{not json".into(), 400),
        (
            "application/x-www-form-urlencoded",
            "PUT",
            "title=t&price=1".into(),
            415,
        ),
        ("application/json", "PUT", big, 413),
    ];
    for (content_type, method, body, status) in cases {
        let url = if method == "POST" {
            app.url("/api/tickets")
        } else {
            app.url(&format!("/api/tickets/{id}"))
        };
        let req = if method == "POST" {
            app.client.post(url)
        } else {
            app.client.put(url)
        };
        let res = req
            .header("cookie", session_cookie("u"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        errors(res, status).await;
    }
    assert_eq!((app.count("tickets"), app.count("events")), (1, 1));
    let res = app
        .client
        .delete(app.url("/api/tickets"))
        .send()
        .await
        .expect("request");
    errors(res, 405).await;
}

#[tokio::test]
async fn fifty_concurrent_updates_leave_consecutive_versions_each_with_one_event() {
    let app = spawn_app().await;
    let ticket = app.create_ok("owner", "t", 1.0).await;
    let id = ticket["id"].as_str().expect("id").to_owned();
    let updates = (0..50).map(|i| {
        let app = &app;
        let id = id.clone();
        async move {
            app.update(
                "owner",
                &id,
                json!({"title": format!("v{i}"), "price": i + 1}),
            )
            .await
            .status()
            .as_u16()
        }
    });
    let statuses = join_all(updates).await;
    let ok = statuses.iter().filter(|s| **s == 200).count() as i64;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 409),
        "only 200 or 409 (lost the race 16 times): {statuses:?}"
    );
    assert!(ok > 0);
    let final_version: i64 = app
        .db()
        .query_row("SELECT version FROM tickets", [], |r| r.get(0))
        .expect("row");
    assert_eq!(final_version, ok, "one version per successful update");
    let versions: Vec<i64> = app
        .db()
        .prepare("SELECT version FROM events ORDER BY version")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(versions, (0..=ok).collect::<Vec<_>>(), "no gap, no repeat");
    // Each event carries the ticket as it was stored at its version.
    let mismatched: i64 = app
        .db()
        .query_row(
            "SELECT COUNT(*) FROM events WHERE json_extract(data, '$.version') != version",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(mismatched, 0);
}

#[tokio::test]
async fn a_failure_between_the_two_writes_leaves_neither() {
    let app = spawn_app().await;
    let ticket = app.create_ok("u", "before", 1.0).await;
    let id = ticket["id"].as_str().expect("id").to_owned();
    // Inject a failure of the second write (the event insert) from outside the process.
    app.db()
        .execute_batch(
            "CREATE TRIGGER fail_events BEFORE INSERT ON events \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        )
        .expect("trigger");
    let errs = errors(
        app.create("u", json!({"title": "t", "price": 1})).await,
        503,
    )
    .await;
    assert!(errs[0].get("field").is_none());
    let errs = errors(
        app.update("u", &id, json!({"title": "after", "price": 2}))
            .await,
        503,
    )
    .await;
    assert!(errs[0].get("field").is_none());
    assert_eq!(app.count("tickets"), 1, "the failed create left no ticket");
    assert_eq!(app.count("events"), 1, "and no event");
    let (title, version): (String, i64) = app
        .db()
        .query_row("SELECT title, version FROM tickets", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("row");
    assert_eq!(
        (title.as_str(), version),
        ("before", 0),
        "the failed update changed nothing"
    );

    // Once the fault is gone, writes succeed again.
    app.db()
        .execute_batch("DROP TRIGGER fail_events")
        .expect("drop");
    let res = app
        .update("u", &id, json!({"title": "after", "price": 2}))
        .await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn openapi_document_describes_the_contract() {
    let app = spawn_app().await;
    let res = app
        .client
        .get(app.url("/api/tickets/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 200);
    let doc: Value = res.json().await.expect("json");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let paths = &doc["paths"];
    for (path, method, statuses) in [
        (
            "/api/tickets",
            "post",
            &["201", "400", "401", "413", "415", "503"][..],
        ),
        ("/api/tickets", "get", &["200", "400"][..]),
        ("/api/tickets/{id}", "get", &["200", "404"][..]),
        (
            "/api/tickets/{id}",
            "put",
            &["200", "400", "401", "404", "409", "413", "415", "503"][..],
        ),
    ] {
        let op = &paths[path][method];
        assert!(op.is_object(), "{method} {path} documented");
        for status in statuses {
            assert!(
                op["responses"][status].is_object(),
                "{method} {path} documents {status}"
            );
        }
    }
    assert!(paths["/api/tickets"]["post"]["security"].is_array());
    let ticket = &doc["components"]["schemas"]["Ticket"];
    let required: Vec<&str> = ticket["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for field in ["id", "title", "price", "userId", "version"] {
        assert!(required.contains(&field), "Ticket requires {field}");
    }
    assert!(ticket["properties"]["orderId"].is_object());
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["session"]["in"], "cookie");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
}
