//! awx-token-operator: keeps Ansible AWX API tokens in Kubernetes Secrets.

pub mod awx;
pub mod connection;
pub mod controller;
pub mod crd;
pub mod decide;
pub mod election;
#[cfg(test)]
mod fixtures;
pub mod login;
pub mod metrics;
pub mod schedule;
pub mod secrets;
pub mod server;
pub mod spec;
pub mod state;
pub mod telemetry;

/// Errors of the reconciler that are not the AwxToken's fault (those become conditions):
/// Kubernetes API trouble and revocation on delete.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    #[error("state Secret {0:?} exists but is not managed by awx-token-operator")]
    StateConflict(String),
    #[error("state Secret {0:?} is unreadable: {1}")]
    StateCorrupt(String, String),
    /// Something changed underneath (a precondition failed): read again and decide anew.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Tokens of a deleted AwxToken could not all be revoked yet.
    #[error("{message}")]
    Revoke {
        message: String,
        retry_in: std::time::Duration,
    },
}

impl Error {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApi",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.reason(),
                _ => "Finalizer",
            },
            Error::StateConflict(_) => "StateConflict",
            Error::StateCorrupt(..) => "StateCorrupt",
            Error::Conflict(_) => "Conflict",
            Error::Revoke { .. } => "RevokeFailed",
        }
    }

    /// The error inside a finalizer's wrapping.
    pub fn innermost(&self) -> &Error {
        match self {
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.innermost(),
                _ => self,
            },
            other => other,
        }
    }

    /// When to try again, where the error knows.
    pub fn retry_in(&self) -> Option<std::time::Duration> {
        match self.innermost() {
            Error::Revoke { retry_in, .. } => Some(*retry_in),
            _ => None,
        }
    }
}
