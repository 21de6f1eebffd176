//! Leader election on a coordination.k8s.io Lease (kube-lease-manager), with one addition: a
//! standby also watches the Lease, so when the leader releases it on shutdown the standby takes
//! over at once instead of when the lease would have expired. (The crate's manager trusts its
//! cached copy of the Lease until that expiry, so the standby starts a fresh manager, which
//! reads the Lease anew.)

use std::{future::Future, pin::Pin, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use kube_lease_manager::{LeaseManager, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

pub type BuildManager = Box<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<LeaseManager, LeaseManagerError>> + Send>>
        + Send
        + Sync,
>;

/// Runs the election until every receiver is dropped, then releases the Lease if held.
/// The receiver says whether this process leads.
pub async fn run(
    build: BuildManager,
    client: Client,
    namespace: &str,
    name: &str,
) -> Result<
    (
        watch::Receiver<bool>,
        JoinHandle<Result<(), LeaseManagerError>>,
    ),
    LeaseManagerError,
> {
    let mut manager = build().await?;
    let (sender, receiver) = watch::channel(false);
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let task = tokio::spawn(async move {
        let mut lease_events = watcher(leases, config).touched_objects().boxed();
        loop {
            let released = tokio::select! {
                biased;
                _ = sender.closed() => return manager.release().await,
                changed = manager.changed() => {
                    match changed {
                        Ok(is_leader) => {
                            let _ = sender.send(is_leader);
                        }
                        Err(e) => {
                            warn!(error = %e, "leader election error; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    false
                }
                event = lease_events.next() => match event {
                    Some(Ok(lease)) => lease
                        .spec
                        .and_then(|s| s.holder_identity)
                        .is_none_or(|holder| holder.is_empty()),
                    Some(Err(e)) => {
                        debug!(error = %e, "Lease watch");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        false
                    }
                    None => false,
                },
            };
            if released && !*sender.borrow() {
                match build().await {
                    Ok(fresh) => {
                        info!("the leader released the Lease; trying to take it");
                        manager = fresh;
                    }
                    Err(e) => warn!(error = %e, "could not restart the election"),
                }
            }
        }
    });
    Ok((receiver, task))
}
