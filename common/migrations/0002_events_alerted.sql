-- Delivering an event deletes it, and queues a "resolved" alert only if it had alerted. This
-- partial index holds just those rare rows, so a delivery finds them without reading the others.
CREATE INDEX events_alerted ON events (id) WHERE alerted_at IS NOT NULL;
