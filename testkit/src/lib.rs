//! Scaffolding for the tests and the benchmark, never a dependency of the shipped binary:
//! real servers of their own (`servers`), the store contract every adapter must pass
//! (`contract`), and MongoDB test databases (`mongo`).

pub mod contract;
pub mod mongo;
pub mod proxy;
pub mod servers;

pub use proxy::AckSwallowingProxy;
pub use servers::{NatsCluster, NatsServer, RedisServer, free_port};
