//! Every setting is an environment variable and a flag of the same meaning (clap `env`).

use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct StoreSettings {
    /// SQLite database file of the embedded store; parent folders are created.
    #[arg(long, env = "SQLITE_PATH", default_value = "data/tickets.db")]
    pub sqlite_path: PathBuf,
    /// MongoDB connection string (a replica set); when set, MongoDB is used instead of SQLite.
    #[arg(long, env = "MONGO_URI", hide_env_values = true)]
    pub mongo_uri: Option<String>,
    /// Lease, in seconds, of an outbox lock: how long a claimed (or newly written) event is
    /// reserved before another worker may take it.
    #[arg(long, env = "OUTBOX_LOCK_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub outbox_lock_secs: u64,
}

impl StoreSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.outbox_lock_secs)
    }
}

#[derive(Debug, Clone, Args)]
pub struct HttpSettings {
    /// Port the HTTP API listens on (all interfaces).
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Secret that signs and verifies the HS256 JWTs of the auth service. Required.
    #[arg(long, env = "JWT_KEY", hide_env_values = true)]
    pub jwt_key: Option<String>,
}

/// The JWT key, or the error message the contract pins.
pub fn require_jwt_key(key: &Option<String>) -> anyhow::Result<String> {
    match key.as_deref().map(str::trim) {
        Some(k) if !k.is_empty() => Ok(k.to_owned()),
        _ => anyhow::bail!("JWT_KEY must be defined"),
    }
}
