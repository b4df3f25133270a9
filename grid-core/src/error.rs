//! The error of grid's public API.

use std::path::PathBuf;

/// What can go wrong starting or using a member.
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    /// The configuration file could not be read. Nothing started.
    #[error("cannot read configuration file {path}: {source}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The configuration is not valid TOML of the expected shape (unknown keys included).
    /// Nothing started.
    #[error("invalid configuration{}: {message}", path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    ConfigInvalid {
        /// The file, if the configuration came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        message: String,
    },
    /// An environment variable override has a value that does not parse.
    #[error("environment variable {name}={value:?} is invalid: {message}")]
    ConfigEnv {
        /// The variable.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong.
        message: String,
    },
    /// A network or membership error (see [`grid_net::NetError`] for what each means).
    #[error(transparent)]
    Net(#[from] grid_net::NetError),
    /// A topic error (bad name, message too large).
    #[error(transparent)]
    Topic(#[from] grid_net::topic::TopicError),
    /// The service refused the operation (e.g. a value that does not decode); nothing
    /// changed.
    #[error("operation failed: {0}")]
    Service(String),
    /// The partition's owner vanished while running an operation that is not safe to
    /// repeat: it may or may not have taken effect. Read back to find out.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The operation could not complete within its deadline (retries included); the last
    /// reason is given. It did not take effect, unless the last reason says the owner
    /// vanished mid-call.
    #[error("no answer within {after:?}: {last}")]
    Timeout {
        /// Time spent.
        after: std::time::Duration,
        /// Why the last attempt did not succeed.
        last: String,
    },
    /// A key or value could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] grid_net::codec::CodecError),
    /// A cache's loader failed; the error is the loader's, and nothing was cached.
    #[error("loader of cache {cache:?} failed: {message}")]
    Loader {
        /// The cache.
        cache: String,
        /// What the loader said.
        message: String,
    },
    /// A cache was opened with settings that differ from those it already has in the
    /// cluster. Open it with the same settings everywhere.
    #[error(
        "cache {cache:?} already exists with other settings: {existing} (asked for {requested})"
    )]
    SettingsConflict {
        /// The cache.
        cache: String,
        /// The settings it has.
        existing: String,
        /// The settings asked for.
        requested: String,
    },
    /// The operation is not allowed by the cache's settings (e.g. `remove_all` on a cache
    /// that is not flushable).
    #[error("not allowed: {0}")]
    NotAllowed(String),
}

impl GridError {
    /// A short name of the error's kind (`timeout`, `indeterminate`, …), as metrics label
    /// errors.
    ///
    /// ```
    /// let e = grid_core::GridError::Service("no".into());
    /// assert_eq!(e.kind(), "service");
    /// ```
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ConfigRead { .. } | Self::ConfigInvalid { .. } | Self::ConfigEnv { .. } => {
                "config"
            }
            Self::Net(_) => "net",
            Self::Topic(_) => "topic",
            Self::Service(_) => "service",
            Self::Indeterminate(_) => "indeterminate",
            Self::Timeout { .. } => "timeout",
            Self::Codec(_) => "codec",
            Self::Loader { .. } => "loader",
            Self::SettingsConflict { .. } => "settings_conflict",
            Self::NotAllowed(_) => "not_allowed",
        }
    }
}
