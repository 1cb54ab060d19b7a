//! Delivery of the tickets outbox to NATS JetStream: the change-feed consumer (first attempt),
//! the `RetryPublishingNATSEvents` sweep job, and webhook alerts for humans; and the orders
//! consumer that applies order events through the inbox (`orders`).

pub mod alerts;
pub mod dispatch;
pub mod feed;
pub mod job;
pub mod nats_auth;
pub mod orders;
pub mod publisher;
pub mod stream;

pub use dispatch::{DispatchConfig, Dispatcher, Outcome, Path};
pub use nats_auth::NatsAuth;
pub use publisher::{FailureKind, JetStreamPublisher, NatsConfig, PublishError};
pub use stream::StreamPolicy;
