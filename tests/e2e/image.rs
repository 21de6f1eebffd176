//! The operator's container image, run as the chart's Deployment runs it: the OCI archive that
//! image/build.sh wrote (what a user loads and pushes) is loaded into a container store of this
//! run, tagged as the image the rendered Deployment names, and started with podman (rootful,
//! no daemon) with the Deployment's arguments, environment, securityContext, memory limit and
//! ServiceAccount token, mounted where the kubelet mounts it. The operator finds the API server
//! through KUBERNETES_SERVICE_HOST/PORT and that token (in-cluster configuration, no
//! kubeconfig), and makes AwxTokens Ready.
//!
//! Departures from a pod, all because everything here is on loopback: host networking (so the
//! HTTP address is 127.0.0.1 and a free port instead of the chart's 0.0.0.0:8080), the API
//! server at 127.0.0.1, and a DNS server of the test's own on a loopback address 127.53.x.y in
//! resolv.conf.
//!
//! The binary in the image is static: the test reaches AWX by a name from /etc/hosts, by a name
//! only that DNS server knows (glibc's "files" and "dns" services, built into the static libc),
//! and over https (rustls with ring; the image's CA bundle is loaded: no empty-store warning).
//!
//! Skipped, saying so, when no archive was built and neither CI nor AWXTO_REQUIRE_IMAGE is set;
//! tests/run-all.sh builds it first.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde_json::{Value, json};

use crate::chart::{
    READY_TIMEOUT, Release, awx_token, install_release, log_shows_no_refusal, strings, wait_ready,
};
use crate::support::{Env, Standin, TestResult, repo_root, skip, wait_for};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where the test's DNS server listens (port 53: resolv.conf has no port): a loopback address
/// of this run's own (from the process id, so two suites on one machine do not meet), away from
/// 127.0.0.1 and systemd-resolved's 127.0.0.53.
fn dns_server() -> Ipv4Addr {
    let [_, _, hi, lo] = std::process::id().to_be_bytes();
    Ipv4Addr::new(127, 53, hi, lo.max(1))
}
/// Known only to the test's DNS server.
const DNS_NAME: &str = "awx-dns.test";
/// Known only to the container's /etc/hosts (podman --add-host).
const HOSTS_NAME: &str = "awx-hosts.test";

/// The archive to run: $AWXTO_IMAGE_ARCHIVE, else where image/build.sh writes it by default.
fn image_archive() -> PathBuf {
    if let Ok(path) = std::env::var("AWXTO_IMAGE_ARCHIVE") {
        return PathBuf::from(path);
    }
    let dir = std::env::var("AWXTO_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let cache = std::env::var("AWXTO_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default())
                        .join(".cache/awx-token-operator")
                });
            cache.join(format!("image-{VERSION}"))
        });
    dir.join(format!("awx-token-operator-{VERSION}.oci.tar"))
}

/// podman, buildah or skopeo on the run's own container store (image/containers.sh).
fn containers(env: &Env, args: &[&str]) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(repo_root().join("image/containers.sh"))
        .arg(env.run_dir.join("containers"))
        .args(args)
        .output()
        .map_err(|e| format!("image/containers.sh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The container, removed (killed if need be) when dropped.
struct Container<'a> {
    env: &'a Env,
    name: String,
}

impl Container<'_> {
    fn inspect(&self, format: &str) -> Result<String, String> {
        containers(
            self.env,
            &[
                "podman",
                "inspect",
                "--type",
                "container",
                "--format",
                format,
                &self.name,
            ],
        )
        .map(|s| s.trim().to_string())
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = containers(
            self.env,
            &["podman", "rm", "--force", "--time", "0", &self.name],
        );
    }
}

/// A DNS server (UDP) that answers A queries for one name with 127.0.0.1, AAAA queries for it
/// with no address, and NXDOMAIN for every other name; it records every question.
struct DnsStandin {
    questions: Arc<Mutex<Vec<(String, u16)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsStandin {
    async fn start(addr: Ipv4Addr, name: &str) -> Result<DnsStandin, String> {
        let socket = tokio::net::UdpSocket::bind((addr, 53)).await.map_err(|e| {
            format!("the DNS stand-in cannot listen on {addr}:53 (UDP; needs root): {e}")
        })?;
        let questions = Arc::new(Mutex::new(Vec::new()));
        let seen = questions.clone();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some((qname, qtype, reply)) = dns_reply(&buf[..n], &name) {
                    seen.lock().unwrap().push((qname, qtype));
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        Ok(DnsStandin { questions, task })
    }

    fn questions_for(&self, name: &str) -> Vec<u16> {
        self.questions
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .collect()
    }
}

impl Drop for DnsStandin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to one DNS query (RFC 1035 §4.1): (name asked, type asked, reply).
fn dns_reply(query: &[u8], known: &str) -> Option<(String, u16, Vec<u8>)> {
    let header = query.get(..12)?;
    if header[2] & 0x80 != 0 || u16::from_be_bytes([header[4], header[5]]) != 1 {
        return None; // a response, or not exactly one question
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // compression is not used in questions
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question = query.get(12..at + 4)?;
    let name = labels.join(".");
    let is_known = name == known;
    let address = is_known && qtype == 1;
    let mut reply = Vec::with_capacity(question.len() + 28);
    reply.extend_from_slice(&header[..2]); // id
    reply.push(0x80 | (header[2] & 0x79) | 0x04); // QR, opcode and RD as asked, AA
    reply.push(0x80 | if is_known { 0 } else { 3 }); // RA; NOERROR or NXDOMAIN
    reply.extend_from_slice(&[0, 1, 0, u8::from(address), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if address {
        // The name at offset 12, A, IN, TTL 5 s, 4 bytes: 127.0.0.1.
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1]);
    }
    Some((name, qtype, reply))
}

/// The podman flags for a container securityContext (the pod's, overridden by the
/// container's): every field the chart sets is mapped, and a field this test does not know
/// fails it, so a chart change cannot silently go untested.
fn security_flags(pod: &Value, container: &Value) -> Result<Vec<String>, String> {
    let mut merged = serde_json::Map::new();
    for sc in [pod, container] {
        if let Some(fields) = sc.as_object() {
            merged.extend(fields.clone());
        }
    }
    let uid = merged.get("runAsUser").and_then(Value::as_u64);
    let gid = merged.get("runAsGroup").and_then(Value::as_u64);
    let (Some(uid), Some(gid)) = (uid, gid) else {
        return Err(format!(
            "the chart sets no runAsUser/runAsGroup: {merged:?}"
        ));
    };
    let mut flags = vec![format!("--user={uid}:{gid}")];
    for (field, value) in &merged {
        match (field.as_str(), value) {
            ("runAsUser" | "runAsGroup", _) => {}
            // The kubelet refuses to start a container whose user is 0.
            ("runAsNonRoot", Value::Bool(true)) => ensure!(uid != 0, "runAsNonRoot with uid 0"),
            // As in a pod: no tmpfs on /tmp either.
            ("readOnlyRootFilesystem", Value::Bool(true)) => {
                flags.extend(["--read-only".into(), "--read-only-tmpfs=false".into()])
            }
            ("allowPrivilegeEscalation", Value::Bool(false)) => {
                flags.push("--security-opt=no-new-privileges".into())
            }
            ("privileged", Value::Bool(false)) => {}
            ("capabilities", caps) if *caps == json!({"drop": ["ALL"]}) => {
                flags.push("--cap-drop=ALL".into())
            }
            // podman's default seccomp profile, as the container runtime's default.
            ("seccompProfile", p) if *p == json!({"type": "RuntimeDefault"}) => {}
            _ => {
                return Err(format!(
                    "securityContext.{field}: {value} has no podman equivalent in tests/e2e/image.rs"
                ));
            }
        }
    }
    Ok(flags)
}

/// A Kubernetes memory quantity in binary units ("256Mi") as bytes, which podman's --memory
/// takes as a plain number.
fn memory_bytes(quantity: &str) -> Result<u64, String> {
    [("Ki", 10), ("Mi", 20), ("Gi", 30)]
        .iter()
        .find_map(|(suffix, shift)| {
            let n: u64 = quantity.strip_suffix(suffix)?.parse().ok()?;
            Some(n << shift)
        })
        .ok_or_else(|| format!("memory limit {quantity:?} not understood"))
}

/// A field of /proc/PID/status, e.g. "Uid".
fn proc_status(pid: &str, field: &str) -> Result<String, String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))
}

/// An AWX user with a password application at `awx`, its credentials in Secret `secret`.
async fn bot(env: &Env, awx: &Standin, ns: &str, user: &str, secret: &str) -> TestResult {
    let password = format!("pw-{user}-{}", std::process::id());
    awx.create_user(user, &password).await?;
    let (id, client_secret) = awx
        .create_app(&format!("{user}-app"), "password", user)
        .await?;
    env.credentials(
        ns,
        secret,
        &[
            ("username", user),
            ("password", &password),
            ("client_id", &id),
            ("client_secret", &client_secret),
        ],
    )
}

fn port_of(url: &str) -> Result<u16, String> {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no port in {url}"))
}

/// The image as a user deploys it, run as the chart's Deployment runs it (module docs).
pub async fn image_runs_as_the_chart_deploys_it(env: Arc<Env>) -> TestResult {
    let archive = image_archive();
    let required =
        std::env::var_os("CI").is_some() || std::env::var_os("AWXTO_REQUIRE_IMAGE").is_some();
    if !archive.is_file() {
        let why = format!(
            "no image archive at {} (image/build.sh writes it; tests/run-all.sh runs it)",
            archive.display()
        );
        ensure!(!required, "{why}");
        return skip(why);
    }
    for tool in ["podman", "runc"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        ensure!(found, "{tool} is missing (image/build.sh installs it)");
    }
    let ops = env.namespace("image-ops").await?;
    let apps = env.namespace("image-apps").await?;
    let t0 = Instant::now();

    // The archive, loaded as a user would, and its config against the chart's Deployment.
    let loaded = containers(
        &env,
        &[
            "podman",
            "load",
            "--quiet",
            "--input",
            &archive.display().to_string(),
        ],
    )?;
    let image = loaded
        .lines()
        .find_map(|l| l.strip_prefix("Loaded image: "))
        .or_else(|| {
            loaded
                .lines()
                .find_map(|l| l.strip_prefix("Loaded image(s): "))
        })
        .ok_or_else(|| format!("podman load said {loaded:?}"))?
        .trim()
        .to_string();
    let config: Value = serde_json::from_str(&containers(
        &env,
        &[
            "podman",
            "image",
            "inspect",
            "--format",
            "{{json .Config}}",
            &image,
        ],
    )?)
    .map_err(|e| e.to_string())?;
    let t_load = t0.elapsed();

    let awx = env.standin("awx")?;
    let (tls_awx, ca) = env.private_tls_standin("image-tls", "awx")?;
    let port = port_of(&awx.url)?;
    let tls_port = port_of(&tls_awx.url)?;
    let dns_server = dns_server();
    let dns = DnsStandin::start(dns_server, DNS_NAME).await?;
    bot(&env, &awx, &apps, "image-bot", "creds").await?;
    bot(&env, &tls_awx, &apps, "image-tls-bot", "tls-creds").await?;

    let hosts = json!([
        format!("{DNS_NAME}:{port}"),
        format!("{HOSTS_NAME}:{port}"),
        format!("127.0.0.1:{tls_port}")
    ]);
    let Release {
        deployment,
        fullname,
        token,
    } = install_release(
        &env,
        "image",
        &ops,
        &[
            "--set",
            &format!("watchNamespace={apps}"),
            "--set-json",
            &format!("allowedAwxHosts={hosts}"),
        ],
    )
    .await?;
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];

    // What the image says about itself is what the chart expects of it.
    let wanted_image = c["image"].as_str().unwrap_or_default().to_string();
    let labels = &config["Labels"];
    ensure_eq!(
        labels["org.opencontainers.image.version"],
        json!(VERSION),
        "the image's version label (the crate's version, the chart's appVersion)"
    );
    ensure!(
        wanted_image.ends_with(&format!(":{VERSION}")),
        "the Deployment's image tag is the image's version: {wanted_image}"
    );
    for label in [
        "org.opencontainers.image.source",
        "org.opencontainers.image.licenses",
    ] {
        ensure!(
            labels[label].as_str().is_some_and(|v| !v.is_empty()),
            "label {label}: {labels}"
        );
    }
    let sc = &c["securityContext"];
    ensure_eq!(
        config["User"],
        json!(format!("{}:{}", sc["runAsUser"], sc["runAsGroup"])),
        "the image's user is the chart's runAsUser:runAsGroup"
    );
    ensure_eq!(
        config["Entrypoint"],
        json!(["/awx-token-operator"]),
        "entrypoint"
    );
    let args = strings(&c["args"]);
    let cmd = strings(&config["Cmd"]);
    ensure_eq!(
        cmd.first(),
        args.first(),
        "the chart's args start with the image's command"
    );
    let container_port = c["ports"][0]["containerPort"].as_u64().unwrap_or_default();
    ensure!(
        config["ExposedPorts"]
            .get(format!("{container_port}/tcp"))
            .is_some(),
        "the image exposes the chart's containerPort {container_port}: {}",
        config["ExposedPorts"]
    );

    // The pod's ServiceAccount volume and the kubelet's environment.
    let sa_dir = env.run_dir.join("image-serviceaccount");
    fs::create_dir_all(&sa_dir).map_err(|e| e.to_string())?;
    let write = |name: &str, content: &[u8]| -> TestResult {
        let path = sa_dir.join(name);
        fs::write(&path, content).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(|e| e.to_string())
    };
    write("token", token.as_bytes())?;
    write("namespace", ops.as_bytes())?;
    write(
        "ca.crt",
        &fs::read(env.run_dir.join("pki/ca.crt")).map_err(|e| e.to_string())?,
    )?;
    let kubeconfig = fs::read_to_string(&env.kubeconfig).map_err(|e| e.to_string())?;
    let api_port = port_of(
        kubeconfig
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .ok_or("no server in the kubeconfig")?,
    )?;
    let pod_name = format!("{fullname}-5c7d9b8f4-image");
    let mut vars = vec![
        (
            "KUBERNETES_SERVICE_HOST".to_string(),
            "127.0.0.1".to_string(),
        ),
        ("KUBERNETES_SERVICE_PORT".to_string(), api_port.to_string()),
    ];
    for var in c["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_string();
        let value = match (
            var["value"].as_str(),
            var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => v.to_string(),
            (None, Some("metadata.name")) => pod_name.clone(),
            (None, Some("metadata.namespace")) => ops.clone(),
            _ => return Err(format!("cannot emulate env var {var}")),
        };
        vars.push((name, value));
    }

    // The container: the chart's args (but the HTTP address, see the module docs).
    let http_port = crate::support::free_port();
    let run_args: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("--http-addr=") {
                format!("--http-addr=127.0.0.1:{http_port}")
            } else {
                a.clone()
            }
        })
        .collect();
    ensure!(
        run_args.contains(&format!("--http-addr=127.0.0.1:{http_port}")),
        "the chart passes --http-addr: {args:?}"
    );
    let limit = c["resources"]["limits"]["memory"]
        .as_str()
        .unwrap_or_default();
    let limit_bytes = memory_bytes(limit)?;
    let log = env.run_dir.join(format!("operator-{apps}-image.log"));
    env.operator_logs.lock().unwrap().push(log.clone());
    containers(&env, &["podman", "tag", &image, &wanted_image])?;
    let name = format!("awxto-e2e-{ops}");
    let mut run: Vec<String> = [
        "podman",
        "run",
        "--detach",
        "--pull=never",
        "--network=host",
        "--ipc=private",
    ]
    .map(String::from)
    .to_vec();
    run.extend([
        format!("--name={name}"),
        format!("--dns={dns_server}"),
        format!("--add-host={HOSTS_NAME}:127.0.0.1"),
        "--log-driver=k8s-file".into(),
        format!("--log-opt=path={}", log.display()),
        format!(
            "--volume={}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
            sa_dir.display()
        ),
        format!("--memory={limit_bytes}"),
    ]);
    run.extend(security_flags(&pod["securityContext"], sc)?);
    for (k, v) in &vars {
        run.push(format!("--env={k}={v}"));
    }
    run.push(wanted_image.clone());
    run.extend(run_args);
    let run_refs: Vec<&str> = run.iter().map(String::as_str).collect();
    containers(&env, &run_refs)?;
    let container = Container {
        env: &env,
        name: name.clone(),
    };
    let started = Instant::now();

    // The kubelet's probes.
    let probe = |path: &'static str| {
        let url = format!("http://127.0.0.1:{http_port}{path}");
        async move {
            Ok(reqwest::get(&url)
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(drop))
        }
    };
    wait_for("/healthz", READY_TIMEOUT, || probe("/healthz")).await?;
    wait_for("/readyz", READY_TIMEOUT, || probe("/readyz")).await?;

    // The process as the kernel sees it.
    let pid = container.inspect("{{.State.Pid}}")?;
    ensure_eq!(
        proc_status(&pid, "Uid")?,
        "65532 65532 65532 65532",
        "uids of the operator"
    );
    ensure_eq!(
        proc_status(&pid, "Gid")?,
        "65532 65532 65532 65532",
        "gids of the operator"
    );
    ensure_eq!(
        proc_status(&pid, "CapEff")?,
        "0000000000000000",
        "effective capabilities"
    );
    ensure_eq!(
        proc_status(&pid, "CapBnd")?,
        "0000000000000000",
        "bounding capabilities"
    );
    ensure_eq!(proc_status(&pid, "NoNewPrivs")?, "1", "no_new_privs");
    ensure_eq!(
        proc_status(&pid, "Seccomp")?,
        "2",
        "a seccomp filter (podman's default profile)"
    );
    let mountinfo =
        fs::read_to_string(format!("/proc/{pid}/mountinfo")).map_err(|e| e.to_string())?;
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .ok_or("no / in the container's mountinfo")?;
    ensure!(
        root.split_whitespace()
            .nth(5)
            .is_some_and(|o| o.split(',').any(|o| o == "ro")),
        "the root filesystem is mounted read-only: {root}"
    );
    ensure_eq!(
        container.inspect("{{.HostConfig.Memory}}")?,
        limit_bytes.to_string(),
        "the chart's memory limit applies"
    );

    // AWX by a name from /etc/hosts, by a name from DNS, and over https with a CA bundle.
    let url = |host: &str, p: u16, scheme: &str| format!("{scheme}://{host}:{p}/");
    env.apply(&awx_token(
        &apps,
        "via-hosts",
        &url(HOSTS_NAME, port, "http"),
        json!({}),
    ))?;
    env.apply(&awx_token(
        &apps,
        "via-dns",
        &url(DNS_NAME, port, "http"),
        json!({}),
    ))?;
    // Over https with the stand-in's private CA: refused without it (the image's CA bundle
    // does not know it), Ready with it.
    let https = |name: &str, ca_secret: Option<&str>| {
        let mut doc = awx_token(&apps, name, &tls_awx.url, json!({}));
        doc["spec"]["awx"]["allowInsecureHttp"] = json!(false);
        if let Some(secret) = ca_secret {
            doc["spec"]["awx"]["caBundleSecretRef"] = json!({"name": secret});
        }
        doc["spec"]["grant"]["credentialsSecretRef"]["name"] = json!("tls-creds");
        doc
    };
    env.credentials(&apps, "awx-ca", &[("ca.crt", &ca)])?;
    env.apply(&https("untrusted", None))?;
    env.apply(&https("trusted", Some("awx-ca")))?;
    for name in ["via-hosts", "via-dns", "trusted"] {
        wait_ready(&env, &apps, name, "True", "TokenReady").await?;
    }
    let t_ready = started.elapsed();
    wait_ready(&env, &apps, "untrusted", "False", "TlsError").await?;
    for (name, awx, user) in [
        ("via-hosts", &awx, "image-bot"),
        ("via-dns", &awx, "image-bot"),
        ("trusted", &tls_awx, "image-tls-bot"),
    ] {
        let token = env
            .secret_value(&apps, name, "token")
            .await?
            .ok_or_else(|| format!("no token in {name}"))?;
        ensure_eq!(
            awx.whoami(&token).await?,
            Some(user.to_string()),
            "the token of {name} works at AWX"
        );
    }
    let dns_types = dns.questions_for(DNS_NAME);
    ensure!(
        dns_types.contains(&1),
        "the operator asked the DNS server for {DNS_NAME} (A): {dns_types:?}"
    );
    ensure!(
        dns.questions_for(HOSTS_NAME).is_empty(),
        "{HOSTS_NAME} came from /etc/hosts, not DNS"
    );
    let peak_kib: u64 = proc_status(&pid, "VmHWM")?
        .trim_end_matches(" kB")
        .parse()
        .map_err(|e| format!("VmHWM: {e}"))?;

    // SIGTERM, as the kubelet stops a pod, with the chart's grace period.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30)
        .to_string();
    let stopping = Instant::now();
    containers(&env, &["podman", "stop", "--time", &grace, &name])?;
    let t_stop = stopping.elapsed();
    ensure_eq!(
        container.inspect("{{.State.ExitCode}}")?,
        "0",
        "exit code after SIGTERM"
    );
    let text = fs::read_to_string(&log).map_err(|e| e.to_string())?;
    ensure!(
        text.contains("released the leader lease"),
        "the Lease released on SIGTERM ({})",
        log.display()
    );
    ensure!(
        !text.contains("system certificate store is empty"),
        "the image's CA bundle is found ({})",
        log.display()
    );
    log_shows_no_refusal(&log)?;
    ensure!(
        peak_kib * 1024 < limit_bytes,
        "peak memory {peak_kib} KiB within the chart's limit {limit}"
    );
    println!(
        "    image {image}: loaded in {:.1}s; 3 AwxTokens Ready {:.1}s after start; \
         stopped in {:.1}s; peak memory {:.1} MiB",
        t_load.as_secs_f64(),
        t_ready.as_secs_f64(),
        t_stop.as_secs_f64(),
        peak_kib as f64 / 1024.0
    );
    drop(container);
    drop(dns);
    Ok(())
}
