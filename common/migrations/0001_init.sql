-- Tickets and their transactional outbox. Timestamps are UTC text of one fixed width
-- ("2026-11-24T19:40:00.123Z") so that they compare and sort as text.

CREATE TABLE tickets (
    id       TEXT PRIMARY KEY,      -- MongoDB ObjectId hex, as in every store
    title    TEXT NOT NULL,
    price    REAL NOT NULL,
    user_id  TEXT NOT NULL,
    version  INTEGER NOT NULL,
    order_id TEXT
);
-- The public listing shows unreserved tickets in id order.
CREATE INDEX tickets_unreserved ON tickets (id) WHERE order_id IS NULL;

-- One row = one undelivered event.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- commit order: the change feed tails it
    id           TEXT NOT NULL UNIQUE,               -- ObjectId hex; the Nats-Msg-Id
    subject      TEXT NOT NULL,
    data         TEXT NOT NULL,                      -- JSON payload published to NATS
    aggregate_id TEXT NOT NULL,
    version      INTEGER NOT NULL,
    is_locked    INTEGER NOT NULL,
    locked_until TEXT NOT NULL,
    locked_by    TEXT,
    failures     TEXT NOT NULL DEFAULT '[]',         -- JSON array of {at, error}, last 10
    attempts     INTEGER NOT NULL DEFAULT 0,
    created_at   TEXT NOT NULL,
    alerted_at   TEXT
);
-- The sweep: "unlocked or lock expired" is exactly "locked_until <= now" (unlocking sets
-- locked_until to the time of unlocking), one range over this index.
CREATE INDEX events_due ON events (locked_until, seq);
-- The per-ticket order rule, and one event per ticket version.
CREATE UNIQUE INDEX events_aggregate_version ON events (aggregate_id, version);

-- Webhook notifications waiting to be sent (an outbox of their own).
CREATE TABLE alerts (
    id           TEXT PRIMARY KEY,   -- {eventId}:{firing|resolved}
    kind         TEXT NOT NULL,
    event        TEXT NOT NULL,      -- JSON snapshot of the event
    created_at   TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    locked_until TEXT NOT NULL
);
CREATE INDEX alerts_due ON alerts (locked_until);

-- Where the change feed has got to, so a restart resumes instead of starting over.
CREATE TABLE feed_positions (
    name     TEXT PRIMARY KEY,
    position TEXT NOT NULL
);
