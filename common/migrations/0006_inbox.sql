-- The orders consumer's inbox: one row per order message applied (or parked), keyed by the
-- message's identity, written in the transaction that changes the ticket, so a message seen again
-- changes nothing.
CREATE TABLE inbox (
    id          TEXT PRIMARY KEY,   -- Nats-Msg-Id, else "{stream}:{sequence}"
    subject     TEXT NOT NULL,
    stream      TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    order_id    TEXT,               -- NULL when the payload could not be read
    ticket_id   TEXT,
    outcome     TEXT NOT NULL,      -- applied | no_op | conflict | parked
    reason      TEXT,               -- why it changed nothing, or why it is parked
    deliveries  INTEGER NOT NULL,
    payload     BLOB NOT NULL,      -- the raw message
    received_at TEXT NOT NULL,
    done_at     TEXT                -- when settled; NULL while parked
) WITHOUT ROWID;
-- The retention sweep: settled records done before a time, one range, in bounded batches.
-- Parked messages are not in it: they stay until an operator replays or drops them.
CREATE INDEX inbox_done ON inbox (done_at) WHERE done_at IS NOT NULL;
-- Parked messages, oldest first (`ticketing inbox list`, the parked gauge).
CREATE INDEX inbox_parked ON inbox (received_at) WHERE done_at IS NULL;
-- Orders whose cancelled was applied: a created that arrives after it changes nothing.
CREATE INDEX inbox_cancelled ON inbox (order_id)
    WHERE subject = 'order.cancelled' AND done_at IS NOT NULL;
