use std::{
    net::SocketAddr,
    num::NonZeroU32,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use awx_token_operator::{
    connection::{self, ConnectionKind},
    controller::{self, Context, Settings},
    crd, election, login,
    metrics::Metrics,
    server::{self, Health},
    spec::parse_duration,
    telemetry::{self, LogFormat},
};
use clap::{Parser, Subcommand};
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Keeps Ansible AWX API tokens in Kubernetes Secrets, renewed and revoked.
#[derive(Parser)]
#[command(name = "awx-token-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (in a cluster, or outside one from a kubeconfig).
    Run(Box<RunArgs>),
    /// Sign in once through the browser (OAuth2 authorization code with PKCE) and write an
    /// AwxToken whose credentials Secret holds a refresh token and no password.
    Login(Box<login::LoginArgs>),
    /// Print the AwxToken CustomResourceDefinition as YAML.
    Crd {
        /// Leave out the CEL rules (x-kubernetes-validations), for Kubernetes older than 1.25.
        #[arg(long)]
        without_cel: bool,
    },
    /// Print the ClusterAwxConnection or AwxConnection CustomResourceDefinition as YAML.
    ConnectionCrd {
        /// Which of the two connection kinds.
        #[arg(value_enum)]
        kind: ConnectionCrdKind,
        /// Leave out the CEL rules (x-kubernetes-validations), for Kubernetes older than 1.25.
        #[arg(long)]
        without_cel: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ConnectionCrdKind {
    ClusterAwxConnection,
    AwxConnection,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "AWX_TOKEN_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Reconcile only the AwxTokens this label selector matches, e.g.
    /// `sharding.fluxcd.io/key=shard-1` (or `!sharding.fluxcd.io/key` for the unlabelled
    /// ones): one shard of several, each with its own Deployment and Lease.
    #[arg(long, env = "AWX_TOKEN_OPERATOR_SHARD_SELECTOR")]
    shard_selector: Option<String>,
    /// Elect a leader through a Lease so only one replica reconciles.
    #[arg(long, env = "AWX_TOKEN_OPERATOR_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "AWX_TOKEN_OPERATOR_LEASE_NAME",
        default_value = "awx-token-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease (default: POD_NAMESPACE, then the watched namespace, then "default").
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Lease duration in seconds; a standby takes over at most this long after the leader dies.
    #[arg(long, env = "AWX_TOKEN_OPERATOR_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// Identity in the Lease (default: POD_NAME, then hostname and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "AWX_TOKEN_OPERATOR_HTTP_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    http_addr: SocketAddr,
    /// Log format.
    #[arg(
        long,
        env = "AWX_TOKEN_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Log level or filter (RUST_LOG wins when set).
    #[arg(long, env = "AWX_TOKEN_OPERATOR_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// AwxTokens reconciled at the same time.
    #[arg(long, env = "AWX_TOKEN_OPERATOR_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Requests per second to one AWX host (0: unlimited): no bursts, and requests spaced 20%
    /// wider than 1/N so AWX never sees more than N in any second despite jitter.
    #[arg(long, env = "AWX_TOKEN_OPERATOR_AWX_MAX_RPS", default_value_t = 20)]
    awx_max_rps: u32,
    /// Requests in flight to one AWX host (0: unlimited).
    #[arg(
        long,
        env = "AWX_TOKEN_OPERATOR_AWX_MAX_IN_FLIGHT",
        default_value_t = 8
    )]
    awx_max_in_flight: usize,
    /// Comma-separated AWX hosts (host, host:port or *.domain) AwxTokens may point at; others
    /// are refused before any request is sent. Default: any.
    #[arg(
        long,
        env = "AWX_TOKEN_OPERATOR_ALLOWED_AWX_HOSTS",
        value_delimiter = ','
    )]
    allowed_awx_hosts: Option<Vec<String>>,
    /// Refuse AwxTokens with an inline spec.awx: only the AWX servers that platform-defined
    /// ClusterAwxConnections and AwxConnections name can be reached.
    #[arg(long, env = "AWX_TOKEN_OPERATOR_REQUIRE_CONNECTION_REF")]
    require_connection_ref: bool,
    /// First retry delay after a failure; doubles per failure.
    #[arg(long, env = "AWX_TOKEN_OPERATOR_BACKOFF_BASE", default_value = "5s", value_parser = parse_duration)]
    backoff_base: Duration,
    /// Longest retry delay after failures.
    #[arg(long, env = "AWX_TOKEN_OPERATOR_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    backoff_max: Duration,
    /// How long in-flight reconciles may finish after SIGTERM before the process exits. Longer
    /// than AWX requests may take (spec.awx.timeoutSeconds, 30 s by default), so a rollout does
    /// not cut requests in flight; the pod's terminationGracePeriodSeconds must be longer still.
    #[arg(long, env = "AWX_TOKEN_OPERATOR_SHUTDOWN_GRACE", default_value = "35s", value_parser = parse_duration)]
    shutdown_grace: Duration,
}

/// Gives every thread glibc's one main malloc arena (`M_ARENA_MAX` 1), unless the environment
/// sets `MALLOC_ARENA_MAX`. By default glibc gives threads arenas of their own (up to 8 per
/// core), and memory freed in one stays there: in the scale benchmark, an operator restarted
/// over 10,100 AwxTokens peaked at 61.2 MiB with them and 53.8 MiB with one arena, reconciling
/// every one in the same 47 s. Called before the runtime starts any thread. Other C libraries
/// (musl) have no such arenas; there this does nothing.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt sets one of glibc's allocator parameters; it takes the arena lock
        // itself and is called here before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::ConnectionCrd { kind, without_cel } => {
            let kind = match kind {
                ConnectionCrdKind::ClusterAwxConnection => ConnectionKind::ClusterAwxConnection,
                ConnectionCrdKind::AwxConnection => ConnectionKind::AwxConnection,
            };
            match connection::crd_yaml(kind, without_cel) {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cannot render the CRD: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Crd { without_cel } => match crd::crd_yaml(without_cel) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Login(args) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // rustls needs one process-wide crypto provider for the kube client.
            let _ = rustls::crypto::ring::default_provider().install_default();
            match runtime.block_on(login::run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("awx-token-operator login: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            one_malloc_arena();
            telemetry::init(args.log_format, &args.log_level);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    error!(error = %e, "cannot start the async runtime");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!(error = %e, "operator stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    // rustls needs one process-wide crypto provider; ring is the only one compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let http_addr = args.http_addr;
    let server = tokio::spawn(async move {
        if let Err(e) = server::serve(http_addr, health).await {
            error!(error = %e, %http_addr, "HTTP server failed");
        }
    });

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    // The operator's own namespace: its Lease, and the Secrets of ClusterAwxConnections.
    let lease_namespace = args
        .lease_namespace
        .clone()
        .or_else(|| args.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let settings = Settings {
        allowed_hosts: args.allowed_awx_hosts.clone().filter(|h| !h.is_empty()),
        backoff_base: args.backoff_base,
        backoff_max: args.backoff_max.max(args.backoff_base),
        awx_max_rps: NonZeroU32::new(args.awx_max_rps),
        awx_max_in_flight: (args.awx_max_in_flight > 0).then_some(args.awx_max_in_flight),
        concurrency: args.concurrency.max(1),
        identity: controller::process_identity(&identity),
        shard_selector: args.shard_selector.clone().filter(|s| !s.is_empty()),
        started_at: Some(jiff::Timestamp::now()),
        connections: awx_token_operator::connection::Policy {
            operator_namespace: lease_namespace.clone(),
            require_connection_ref: args.require_connection_ref,
            cluster_connections: args.namespace.is_none(),
        },
    };
    let ctx = Arc::new(Context::new(client.clone(), settings, metrics.clone()));
    info!(namespace = ?args.namespace, shard = ?args.shard_selector, leader_elect = args.leader_elect, %identity, "starting");

    if !args.leader_elect {
        metrics.leader.set(1);
        run_bounded(
            ctx,
            args.namespace.clone(),
            shutdown.clone(),
            ready,
            args.shutdown_grace,
        )
        .await;
        server.abort();
        return Ok(());
    }

    let duration = args.lease_duration.max(2);
    let build: election::BuildManager = {
        let (client, name, ns, identity) = (
            client.clone(),
            args.lease_name.clone(),
            lease_namespace.clone(),
            identity.clone(),
        );
        Box::new(move || {
            let builder = LeaseManagerBuilder::new(client.clone(), &name)
                .with_namespace(&ns)
                .with_identity(&identity)
                .with_duration(duration)
                .with_grace((duration / 3).max(1));
            Box::pin(builder.build())
        })
    };
    let (mut leader, election) =
        election::run(build, client, &lease_namespace, &args.lease_name).await?;
    // A standby running the election loop is ready: it can take over at any moment.
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    info!(lease = %args.lease_name, namespace = %lease_namespace, "waiting for leadership");
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        changed = leader.wait_for(|is_leader| *is_leader) => changed.map(drop),
    };
    if outcome.is_ok() && !shutdown.is_cancelled() {
        info!("became leader");
        metrics.leader.set(1);
        let term = shutdown.child_token();
        let mut watch = leader.clone();
        let lost = term.clone();
        let lost_watch = tokio::spawn(async move {
            let _ = watch.wait_for(|is_leader| !*is_leader).await;
            lost.cancel();
        });
        let synced = Arc::new(AtomicBool::new(false));
        run_bounded(
            ctx,
            args.namespace.clone(),
            term,
            synced,
            args.shutdown_grace,
        )
        .await;
        metrics.leader.set(0);
        // Its receiver clone must go too, or the election task never sees the channel close.
        lost_watch.abort();
        let _ = lost_watch.await;
        if !shutdown.is_cancelled() {
            warn!("lost leadership; exiting so a fresh process can stand by");
        }
    }
    // Dropping the receiver makes the election task release the Lease.
    drop(leader);
    match tokio::time::timeout(Duration::from_secs(3), election).await {
        Ok(Ok(Ok(()))) => info!("released the leader lease"),
        Ok(Ok(Err(e))) => warn!(error = %e, "could not release the leader lease"),
        Ok(Err(e)) => warn!(error = %e, "election task failed"),
        Err(_) => warn!("timed out releasing the leader lease"),
    }
    server.abort();
    if shutdown.is_cancelled() {
        Ok(())
    } else {
        Err("leadership lost".into())
    }
}

/// Runs the controller until `stop` fires, then gives in-flight reconciles `grace` to finish.
async fn run_bounded(
    ctx: Arc<Context>,
    namespace: Option<String>,
    stop: CancellationToken,
    ready: Arc<AtomicBool>,
    grace: Duration,
) {
    let signal = stop.clone();
    let controller = controller::run(
        ctx,
        namespace,
        async move { signal.cancelled().await },
        ready,
    );
    tokio::pin!(controller);
    tokio::select! {
        _ = &mut controller => {}
        _ = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            warn!(?grace, "in-flight reconciles did not finish in time; stopping");
        }
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "awx-token-operator".into());
    format!("{host}-{}", std::process::id())
}
