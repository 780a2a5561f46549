//! What goes wrong in the running system, as the actors, the supervisor and
//! the remote roles report it to each other and to the caller of a run.

use crate::backend::BackendError;

/// A run's failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A backend (the model engine, the labeler, the learner) failed at `what`.
    #[error("{what}: {source}")]
    Backend {
        what: String,
        #[source]
        source: BackendError,
    },
    /// A message found an actor of the run stopped, or a call got no answer.
    #[error("{0}")]
    Unanswered(String),
    /// A blocking thread panicked or was cancelled, or what it held was lost.
    #[error("{0}")]
    Thread(String),
    /// A transport of a distributed run failed.
    #[error(transparent)]
    Transport(#[from] prism_transport::Error),
    /// The run failed: an actor exhausted its restart budget, a learner rank
    /// was lost, the shutdown timed out. The message says which and why.
    #[error("{0}")]
    Run(String),
}

impl Error {
    /// `source` failing at `what`.
    pub fn backend(what: impl Into<String>, source: BackendError) -> Self {
        Self::Backend { what: what.into(), source }
    }
}

impl<T> From<ractor::MessagingErr<T>> for Error {
    fn from(e: ractor::MessagingErr<T>) -> Self {
        Self::Unanswered(e.to_string())
    }
}

/// The result of the running system's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
