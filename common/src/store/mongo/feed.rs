//! Where the MongoDB store picks its change feed: a change stream of inserts into `events`,
//! tailed by [`Tail`] (the writers are other pods; the stream is what tells this one). A saved
//! position is a resume token; one that fell off the oplog starts the stream from now, and the
//! sweep delivers what that skips. Every replica saves to one position document, which only
//! moves forward (a lagging replica cannot move it back). Each (re)opening of the stream first
//! creates the `events` indexes: a dropped collection invalidates the stream (which is then
//! reopened), and is recreated by the next insert without them.

use super::MongoStore;
use super::codec::Fields;
use super::errors::{self, Facts};
use crate::domain::EventId;
use crate::outbox::Claimer;
use crate::store::feed::{FEED_NAME, Tail};
use crate::store::{
    ChangeSource, ChangeStream, FeedItem, FeedPosition, FreshEvents, FreshFeed, Outbox, StoreError,
};
use bson::{Document, doc};
use futures::StreamExt;
use mongodb::change_stream::event::ResumeToken;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[async_trait::async_trait]
impl FreshEvents for MongoStore {
    async fn subscribe(
        &self,
        claimer: &Claimer,
        stop: CancellationToken,
    ) -> Result<Box<dyn FreshFeed>, StoreError> {
        let outbox: Arc<dyn Outbox> = Arc::new(self.clone());
        let tail = Tail::open(self.clone(), outbox, claimer, stop).await?;
        tracing::info!("change feed: the change stream of `events`");
        Ok(Box::new(tail))
    }
}

impl MongoStore {
    async fn open_change_stream(
        &self,
        from: Option<ResumeToken>,
    ) -> mongodb::error::Result<
        mongodb::change_stream::ChangeStream<
            mongodb::change_stream::event::ChangeStreamEvent<Document>,
        >,
    > {
        let pipeline = [
            doc! {"$match": {"operationType": "insert"}},
            // Only what the feed needs (the driver requires `_id`, `operationType` and `ns`):
            // not the whole inserted document.
            doc! {"$project": {"operationType": 1, "ns": 1, "documentKey": 1}},
        ];
        self.events
            .watch()
            .pipeline(pipeline)
            .resume_after(from)
            .await
    }
}

#[async_trait::async_trait]
impl ChangeSource for MongoStore {
    /// The change stream of inserts into `events`. `None`: from now.
    async fn changes(&self, from: Option<FeedPosition>) -> Result<ChangeStream, StoreError> {
        self.create_event_indexes().await?;
        let token = from.and_then(|p| match serde_json::from_str::<ResumeToken>(&p.0) {
            Ok(t) => Some(t),
            Err(e) => {
                // The position is a hint: the sweep covers whatever the feed skips.
                tracing::warn!(position = %p.0, error = %e,
                    "change feed: the saved position is not a resume token; starting from now");
                None
            }
        });
        let resuming = token.is_some();
        let stream = match self.open_change_stream(token).await {
            Ok(stream) => stream,
            Err(e) if resuming && Facts::of(&e).is_history_lost() => {
                // The events in the gap are still in the outbox, locked for the change feed
                // until their fresh lock expires; then the sweep takes them.
                tracing::warn!(error = %crate::error_chain(&e),
                    "change feed: the saved position fell off the oplog; starting from now \
                     (the sweep delivers what was missed)");
                self.open_change_stream(None)
                    .await
                    .map_err(|e| errors::backend("change_feed", e))?
            }
            Err(e) => return Err(errors::backend("change_feed", e)),
        };
        let feed = stream.filter_map(|item| async move {
            let change = match item {
                Ok(change) => change,
                Err(e) => return Some(Err(errors::backend("change_feed", e))),
            };
            let id = change
                .document_key
                .as_ref()
                .and_then(|k| k.get_object_id("_id").ok());
            let Some(id) = id else {
                tracing::warn!(key = ?change.document_key, "change feed: an insert without an ObjectId _id; skipped");
                return None;
            };
            let position = match serde_json::to_string(&change.id) {
                Ok(p) => FeedPosition(p),
                Err(e) => return Some(Err(StoreError::backend("change_feed", e))),
            };
            Some(Ok(FeedItem {
                event_id: EventId::from_object_id(id),
                position,
            }))
        });
        Ok(Box::pin(feed))
    }

    async fn load_position(&self) -> Result<Option<FeedPosition>, StoreError> {
        let found = self
            .feed_positions
            .find_one(doc! {"_id": FEED_NAME})
            .await
            .map_err(|e| errors::backend("load_feed_position", e))?;
        found
            .map(|d| {
                Fields::new("feed_positions", &d)
                    .str("position")
                    .map(|p| FeedPosition(p.to_owned()))
            })
            .transpose()
    }

    /// Saves `position` unless a later one is saved (`$max`: resume tokens' `_data` are hex
    /// strings that sort in the order of the stream, and the JSON text around them is the same).
    async fn save_position(&self, position: &FeedPosition) -> Result<(), StoreError> {
        let result = self
            .feed_positions
            .update_one(
                doc! {"_id": FEED_NAME},
                doc! {"$max": {"position": &position.0}},
            )
            .upsert(true)
            .await;
        match result {
            Ok(_) => Ok(()),
            // Two first saves raced: the other one created the document; save over it.
            Err(e) if Facts::of(&e).is_duplicate_key() => self
                .feed_positions
                .update_one(
                    doc! {"_id": FEED_NAME},
                    doc! {"$max": {"position": &position.0}},
                )
                .await
                .map(drop)
                .map_err(|e| errors::backend("save_feed_position", e)),
            Err(e) => Err(errors::backend("save_feed_position", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_positions_sort_as_the_stream_does() {
        // Tokens of MongoDB 7 (v1 `_data`: cluster time first, then the event's key), in the
        // order the stream gave them; the saved text is compared as a string by `$max`.
        let tokens = [
            r#"{"_data":"8265A1B2C3000000012B022C0100296E5A1004"}"#,
            r#"{"_data":"8265A1B2C3000000022B022C0100296E5A1004"}"#,
            r#"{"_data":"8265A1B2C4000000012B022C0100296E5A1004"}"#,
            r#"{"_data":"8265A1B2C4000000012B042C0100296E5A1004"}"#,
        ];
        for pair in tokens.windows(2) {
            let a: ResumeToken = serde_json::from_str(pair[0]).expect("token");
            let b: ResumeToken = serde_json::from_str(pair[1]).expect("token");
            let (a, b) = (
                serde_json::to_string(&a).expect("json"),
                serde_json::to_string(&b).expect("json"),
            );
            assert!(a < b, "{a} < {b}");
        }
    }

    #[test]
    fn resume_tokens_survive_a_json_round_trip() {
        let json = r#"{"_data":"8265A1B2C3000000012B022C0100296E5A1004"}"#;
        let token: ResumeToken = serde_json::from_str(json).expect("parse token");
        assert_eq!(serde_json::to_string(&token).expect("write token"), json);
    }
}
