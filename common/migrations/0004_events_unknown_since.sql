-- When the earliest publish attempt of unknown outcome (sent, no PubAck) was sent, while no
-- read of the stream has shown the event absent since: the stream may hold it from then on, and
-- once JetStream's duplicate window may have passed, the stream is read before a re-publish.
ALTER TABLE events ADD COLUMN unknown_since TEXT;
