//! awx-token-operator: keeps Ansible AWX API tokens in Kubernetes Secrets.

pub mod awx;
pub mod controller;
pub mod crd;
pub mod decide;
pub mod election;
#[cfg(test)]
mod fixtures;
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
    #[error("{0}")]
    Revoke(String),
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
            Error::Revoke(_) => "RevokeFailed",
        }
    }
}
