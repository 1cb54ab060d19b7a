-- Events that failed at least once (rare but for an outage). The past-threshold gauge counts
-- this index's entries instead of reading every waiting row; the happy path (insert with
-- attempts = 0, deliver, delete) never writes it.
CREATE INDEX events_failing ON events (attempts) WHERE attempts > 0;
