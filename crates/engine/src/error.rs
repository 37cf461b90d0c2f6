//! Engine errors: each says in one line what went wrong and, where the user
//! can act, what to do.

use thiserror::Error;

/// Why a job failed; the variant tells the caller what it can do about it.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] strata_catalog::CatalogError),
    /// The repository failed (storage, format, encryption).
    #[error(transparent)]
    Repo(#[from] strata_repo::RepoError),
    /// The key management service refused or failed (a disabled or deleted
    /// key, credentials it does not accept, unreachable).
    #[error(transparent)]
    Kms(#[from] strata_kms::KmsError),
    /// A job that needs every instance's backups (garbage collection,
    /// verify, reindex) could not unlock an encrypted instance's key domain:
    /// it did nothing.
    #[error(
        "{job} needs every instance's backups, but those of instance {} are encrypted under KMS key {}, which cannot be used now ({}); nothing was done",
        locked.instance_id,
        locked.kms_key_id,
        locked.error
    )]
    DomainLocked {
        /// The job refused.
        job: String,
        /// The instance, its key and what the KMS said.
        locked: Box<crate::LockedDomain>,
    },
    /// A server problem a retry will not fix, already phrased for the user.
    #[error("{0}")]
    Server(String),
    /// The server cannot be reached or went away (network, restart): worth a retry.
    #[error("{0}")]
    Unreachable(String),
    /// A restored server failed to start or to finish recovery; its
    /// directory is kept for the log.
    #[error("{0}")]
    RestoredServer(String),
    /// The request cannot be carried out as asked (bad target, not-empty
    /// directory, missing binaries...).
    #[error("{0}")]
    Refused(String),
    /// Another job holds what this one needs (a running backup of the same
    /// instance); retry later.
    #[error("{0}")]
    Conflict(String),
    /// A local file or process could not be used.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The job ran and failed; the message says why.
    #[error("{0}")]
    Failed(String),
    /// The job was stopped (shutdown, cancellation).
    #[error("interrupted")]
    Interrupted,
}

impl EngineError {
    /// Wraps an I/O error with what was being done (for `map_err`).
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
        let context = context.into();
        move |source| EngineError::Io { context, source }
    }

    /// Whether a retry (reconnect) may succeed: network trouble and servers
    /// restarting, not wrong passwords or missing privileges.
    pub fn is_transient(&self) -> bool {
        match self {
            EngineError::Unreachable(_) => true,
            EngineError::Repo(e) => e.is_transient(),
            // The catalog server restarting or failing over.
            EngineError::Catalog(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// What the engine's jobs return.
pub type EngineResult<T> = Result<T, EngineError>;
