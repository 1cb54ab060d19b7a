-- When the last digest of each kind (firing, resolved) was posted: one sender per turn, at most
-- one digest of a kind per ALERT_DIGEST_SECS, whatever the number of worker replicas.
CREATE TABLE alert_digests (
    kind    TEXT PRIMARY KEY,
    sent_at TEXT NOT NULL
);
-- Digests claim one kind at a time.
CREATE INDEX alerts_due_by_kind ON alerts (kind, locked_until);
