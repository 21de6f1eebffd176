//! The end-to-end environment: a real kube-apiserver (+ controller-manager) and AWX stand-ins
//! on loopback, operator processes, and helpers to drive and observe them.

use std::{
    collections::BTreeSet,
    fs,
    future::Future,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{Api, Client, api::PostParams};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub type TestResult = Result<(), String>;

/// What `skip` puts before its reason: the harness reports such a scenario as skipped.
pub const SKIPPED: &str = "skipped: ";

/// Ends a scenario that cannot run here (e.g. no image was built), saying why.
pub fn skip(reason: impl std::fmt::Display) -> TestResult {
    Err(format!("{SKIPPED}{reason}"))
}

/// Fails the scenario with a message (scenarios return `TestResult`).
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($msg)+)));
        }
    };
}

#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($msg:tt)+) => {
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err(format!("{}:{}: {}: {:?} != {:?}", file!(), line!(), format!($($msg)+), l, r));
        }
    };
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Env {
    pub run_dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub tools_bin: PathBuf,
    pub operator_bin: PathBuf,
    pub client: Client,
    /// Set when this process started the environment (and so must stop it).
    owned: bool,
    /// Every secret value the tests saw (tokens, passwords, client secrets): none may appear
    /// in any operator log.
    pub secrets_seen: Mutex<BTreeSet<String>>,
    /// Operator log files, for the leak check.
    pub operator_logs: Mutex<Vec<PathBuf>>,
    /// Shared stand-ins by mode.
    standins: Mutex<Vec<(String, Arc<Standin>)>>,
}

impl Env {
    /// Uses the environment of tests/env/with-env.sh when present, else starts one.
    pub async fn start() -> Result<Arc<Env>, String> {
        let (run_dir, owned) = match std::env::var("AWXTO_TEST_RUN_DIR") {
            Ok(dir) if Path::new(&dir).join("kubeconfig").exists() => (PathBuf::from(dir), false),
            _ => {
                let dir = tempdir("awxto-e2e")?;
                let status = Command::new("bash")
                    .arg(repo_root().join("tests/env/up.sh"))
                    .arg(&dir)
                    .status()
                    .map_err(|e| format!("cannot run tests/env/up.sh: {e}"))?;
                if !status.success() {
                    return Err(format!("tests/env/up.sh failed ({status})"));
                }
                (dir, true)
            }
        };
        let kubeconfig = run_dir.join("kubeconfig");
        let tools_bin = match std::env::var("AWXTO_TOOLS_BIN") {
            Ok(p) => PathBuf::from(p),
            Err(_) => PathBuf::from(
                sh_output(&format!(
                    "bash {}/tests/env/tools-bin.sh",
                    repo_root().display()
                ))?
                .lines()
                .last()
                .unwrap_or_default(),
            ),
        };
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).map_err(|e| e.to_string())?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let client = Client::try_from(config).map_err(|e| e.to_string())?;
        let env = Arc::new(Env {
            run_dir,
            kubeconfig,
            tools_bin,
            // AWXTO_OPERATOR_BIN runs the operator through something else, e.g. a heap profiler.
            operator_bin: std::env::var_os("AWXTO_OPERATOR_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_awx-token-operator"))),
            client,
            owned,
            secrets_seen: Mutex::default(),
            operator_logs: Mutex::default(),
            standins: Mutex::default(),
        });
        env.install_crd()?;
        Ok(env)
    }

    /// Applies the CRD (without CEL: the test API server is 1.20) and restarts the
    /// controller-manager so its garbage collector knows the new type at once.
    fn install_crd(&self) -> TestResult {
        let crd = Command::new(&self.operator_bin)
            .args(["crd", "--without-cel"])
            .output()
            .map_err(|e| e.to_string())?;
        ensure!(crd.status.success(), "crd command failed");
        self.kubectl_stdin(&["apply", "-f", "-"], &String::from_utf8_lossy(&crd.stdout))?;
        for kind in ["cluster-awx-connection", "awx-connection"] {
            let crd = Command::new(&self.operator_bin)
                .args(["connection-crd", kind, "--without-cel"])
                .output()
                .map_err(|e| e.to_string())?;
            ensure!(crd.status.success(), "connection-crd {kind} failed");
            self.kubectl_stdin(&["apply", "-f", "-"], &String::from_utf8_lossy(&crd.stdout))?;
        }
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/awxtokens.awx-token-operator.io",
            "crd/clusterawxconnections.awx-token-operator.io",
            "crd/awxconnections.awx-token-operator.io",
            "--timeout=30s",
        ])?;
        let status = Command::new("bash")
            .arg(repo_root().join("tests/env/cluster.sh"))
            .args(["restart-kcm"])
            .arg(&self.run_dir)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        ensure!(status.success(), "restart-kcm failed");
        Ok(())
    }

    pub fn stop(&self) {
        for (_, s) in self.standins.lock().unwrap().drain(..) {
            s.stop();
        }
        if self.owned {
            let _ = Command::new("bash")
                .arg(repo_root().join("tests/env/down.sh"))
                .arg(&self.run_dir)
                .status();
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl_stdin(args, "")
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String, String> {
        let run = run_tool(self, "kubectl", &self.kubeconfig, args, stdin)?;
        if run.ok {
            Ok(run.stdout)
        } else {
            Err(format!(
                "kubectl {} failed: {}",
                args.join(" "),
                run.stderr.trim()
            ))
        }
    }

    /// A fresh namespace for one scenario.
    pub async fn namespace(&self, name: &str) -> Result<String, String> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .map_err(|e| format!("create namespace {name}: {e}"))?;
        Ok(name.to_string())
    }

    /// The shared stand-in of a mode (awx, gateway, generic), started on first use.
    pub fn standin(&self, mode: &str) -> Result<Arc<Standin>, String> {
        let mut standins = self.standins.lock().unwrap();
        if let Some((_, s)) = standins.iter().find(|(m, _)| m == mode) {
            return Ok(s.clone());
        }
        let s = Arc::new(Standin::start(
            &self.run_dir.join(format!("standin-{mode}")),
            mode,
        )?);
        standins.push((mode.to_string(), s.clone()));
        Ok(s)
    }

    /// A stand-in of its own, for scenarios that change lifetimes or take AWX down.
    pub fn private_standin(&self, name: &str, mode: &str) -> Result<Arc<Standin>, String> {
        let s = Arc::new(Standin::start(
            &self.run_dir.join(format!("standin-{name}")),
            mode,
        )?);
        self.standins
            .lock()
            .unwrap()
            .push((format!("private-{name}"), s.clone()));
        Ok(s)
    }

    /// A stand-in of its own serving https with a certificate for 127.0.0.1 from a fresh test
    /// CA; returns it and the CA certificate (PEM).
    pub fn private_tls_standin(
        &self,
        name: &str,
        mode: &str,
    ) -> Result<(Arc<Standin>, String), String> {
        let dir = self.run_dir.join(format!("standin-{name}"));
        let pki = dir.join("pki");
        fs::create_dir_all(&pki).map_err(|e| e.to_string())?;
        let script = format!(
            "set -e; cd {pki}
             openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=awx-test-ca -keyout ca.key -out ca.crt
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 -keyout tls.key -out tls.csr
             printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext
             openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out tls.crt",
            pki = pki.display()
        );
        let out = Command::new("bash")
            .args(["-c", &script])
            .output()
            .map_err(|e| e.to_string())?;
        ensure!(
            out.status.success(),
            "openssl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ca = fs::read_to_string(pki.join("ca.crt")).map_err(|e| e.to_string())?;
        let s = Arc::new(Standin::start_with(
            &dir,
            mode,
            Some((pki.join("tls.crt"), pki.join("tls.key"))),
        )?);
        self.standins
            .lock()
            .unwrap()
            .push((format!("private-{name}"), s.clone()));
        Ok((s, ca))
    }

    pub fn remember_secret(&self, value: &str) {
        if value.len() >= 8 {
            self.secrets_seen.lock().unwrap().insert(value.to_string());
        }
    }

    pub fn start_operator(&self, namespace: &str, extra: &[&str]) -> Result<Operator, String> {
        let log = self.run_dir.join(format!(
            "operator-{namespace}-{}.log",
            self.operator_logs.lock().unwrap().len()
        ));
        self.operator_logs.lock().unwrap().push(log.clone());
        Operator::start(self, namespace, extra, log)
    }

    /// Like `start_operator`, but authenticated by `kubeconfig` instead of the admin one (e.g.
    /// a ServiceAccount's token), with extra environment variables (e.g. what the downward API
    /// sets in a pod).
    pub fn start_operator_as(
        &self,
        namespace: &str,
        extra: &[&str],
        kubeconfig: &Path,
        vars: &[(String, String)],
    ) -> Result<Operator, String> {
        let log = self.run_dir.join(format!(
            "operator-{namespace}-{}.log",
            self.operator_logs.lock().unwrap().len()
        ));
        self.operator_logs.lock().unwrap().push(log.clone());
        let mut op = Operator::new(self, namespace, extra, log, kubeconfig, vars);
        op.spawn()?;
        Ok(op)
    }

    pub async fn secret(&self, ns: &str, name: &str) -> Result<Option<Secret>, String> {
        Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(|e| e.to_string())
    }

    /// The value under `key` of a Secret, recorded for the leak check.
    pub async fn secret_value(
        &self,
        ns: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<String>, String> {
        let Some(secret) = self.secret(ns, name).await? else {
            return Ok(None);
        };
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned());
        if let Some(v) = &value {
            self.remember_secret(v);
        }
        Ok(value)
    }

    pub async fn awx_token(&self, ns: &str, name: &str) -> Result<Option<Value>, String> {
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            ns,
            &kube::api::ApiResource {
                group: "awx-token-operator.io".into(),
                version: "v1alpha1".into(),
                api_version: "awx-token-operator.io/v1alpha1".into(),
                kind: "AwxToken".into(),
                plural: "awxtokens".into(),
            },
        );
        match api.get_opt(name).await {
            Ok(Some(o)) => Ok(Some(serde_json::to_value(o).map_err(|e| e.to_string())?)),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Creates a Secret with string data.
    pub fn credentials(&self, ns: &str, name: &str, data: &[(&str, &str)]) -> TestResult {
        // Usernames and client ids are not secret (status shows the user).
        for (k, v) in data {
            if !matches!(*k, "username" | "client_id") {
                self.remember_secret(v);
            }
        }
        let string_data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let doc = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns}, "stringData": string_data});
        self.kubectl_stdin(&["apply", "-f", "-"], &doc.to_string())?;
        Ok(())
    }

    pub fn apply(&self, doc: &Value) -> TestResult {
        self.kubectl_stdin(&["apply", "-f", "-"], &doc.to_string())?;
        Ok(())
    }

    /// Runs the awx CLI of awxkit 24.6.1 (`tests/awx-standin/standin.sh venv awxkit` installs
    /// it from PyPI into a virtualenv cached by version, once) with exactly the environment
    /// `vars` and a HOME of its own, so nothing but `vars` configures it. Blocks: call it from
    /// `spawn_blocking`.
    pub fn awx_cli(&self, vars: &[(String, String)], args: &[&str]) -> Result<Run, String> {
        static VENV: Mutex<Option<PathBuf>> = Mutex::new(None);
        let venv = {
            let mut venv = VENV.lock().map_err(|e| e.to_string())?;
            match &*venv {
                Some(path) => path.clone(),
                None => {
                    let path = PathBuf::from(
                        sh_output(&format!(
                            "bash {}/tests/awx-standin/standin.sh venv awxkit",
                            repo_root().display()
                        ))?
                        .lines()
                        .last()
                        .unwrap_or_default(),
                    );
                    *venv = Some(path.clone());
                    path
                }
            }
        };
        let home = self.run_dir.join("awx-cli-home");
        fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        let out = Command::new(venv.join("bin/awx"))
            .args(args)
            .env_clear()
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .env("HOME", &home)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("awx: {e}"))?;
        Ok(Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Condition `type_` of an AwxToken object as (status, reason, message).
pub fn condition(obj: &Value, type_: &str) -> Option<(String, String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find_map(|c| {
            (c["type"] == type_).then(|| {
                (
                    c["status"].as_str().unwrap_or_default().to_string(),
                    c["reason"].as_str().unwrap_or_default().to_string(),
                    c["message"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
}

/// Polls `check` every 200 ms until it yields a value or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = String::new();
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = e,
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what} {last_error}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Arrival times of a stand-in's request log entries (from the `skip`-th on), sorted, and the
/// most of them within any one second.
pub fn arrivals(log: &[Value], skip: usize) -> (Vec<f64>, usize) {
    let mut times: Vec<f64> = log
        .iter()
        .skip(skip)
        .filter_map(|r| r["time"].as_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    let busiest = (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t < times[i] + 1.0)
                .count()
        })
        .max()
        .unwrap_or(0);
    (times, busiest)
}

pub fn sha256_hex(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

fn tempdir(prefix: &str) -> Result<PathBuf, String> {
    let base = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
    let dir = PathBuf::from(base).join(format!("{prefix}-{}-{}", std::process::id(), nanos()));
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn sh_output(cmd: &str) -> Result<String, String> {
    let out = Command::new("bash")
        .args(["-c", cmd])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{cmd} failed"))
    }
}

/// An error with its sources ("error sending request" alone does not say what failed).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// PBKDF2 cost of the stand-ins' password hashes: `AWXTO_E2E_PASSWORD_ITERATIONS`, else AWX's
/// (Django 4.2's default, 600000: about 0.2-0.3 s of CPU per password check), so that the
/// operator is tested against an AWX as slow to log in as the real one. Scenarios about crashes
/// or timing rather than AWX's cost lower it for their own stand-in and say why.
fn password_hash_iterations() -> String {
    std::env::var("AWXTO_E2E_PASSWORD_ITERATIONS")
        .ok()
        .filter(|v| v.parse::<u32>().is_ok_and(|n| n > 0))
        .unwrap_or_else(|| "600000".to_string())
}

/// One AWX stand-in process (tests/awx-standin).
pub struct Standin {
    pub url: String,
    pub mode: String,
    dir: PathBuf,
    port: u16,
    /// Certificate and key when it serves https.
    tls: Option<(PathBuf, PathBuf)>,
    http: reqwest::Client,
}

impl Standin {
    fn start(dir: &Path, mode: &str) -> Result<Standin, String> {
        Self::start_with(dir, mode, None)
    }

    fn start_with(
        dir: &Path,
        mode: &str,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> Result<Standin, String> {
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let port = free_port();
        let url = Self::launch(dir, mode, port, tls.as_ref())?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Standin {
            url,
            mode: mode.to_string(),
            dir: dir.to_path_buf(),
            port,
            tls,
            // The tests' own client (control API, whoami) trusts the stand-in's test certificate.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                // The stand-in closes idle connections after 65 s (as AWX's nginx); keep far below.
                .pool_idle_timeout(Duration::from_secs(1))
                .danger_accept_invalid_certs(true)
                .build()
                .map_err(|e| e.to_string())?,
        })
    }

    fn launch(
        dir: &Path,
        mode: &str,
        port: u16,
        tls: Option<&(PathBuf, PathBuf)>,
    ) -> Result<String, String> {
        let mut tls_args: Vec<&std::ffi::OsStr> = Vec::new();
        if let Some((cert, key)) = tls {
            tls_args.extend([
                "--tls-cert".as_ref(),
                cert.as_os_str(),
                "--tls-key".as_ref(),
                key.as_os_str(),
            ]);
        }
        let out = Command::new("bash")
            .arg(repo_root().join("tests/awx-standin/standin.sh"))
            .arg("start")
            .arg(dir)
            .args(["--mode", mode, "--port", &port.to_string()])
            .args(["--password-hash-iterations", &password_hash_iterations()])
            .args(tls_args)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("standin.sh start {mode} failed"));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string())
    }

    /// Stops the process (AWX down). The database stays for `restart`.
    pub fn stop(&self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("tests/awx-standin/standin.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }

    /// Starts it again on the same port with the same database (AWX back).
    pub fn restart(&self) -> TestResult {
        Self::launch(&self.dir, &self.mode, self.port, self.tls.as_ref()).map(drop)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("stand-in {path}: {}", error_chain(&e)))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("stand-in {method} {path}: {status} {text}"));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn create_user(&self, username: &str, password: &str) -> TestResult {
        self.call(
            reqwest::Method::POST,
            "/_standin/users",
            Some(json!({"username": username, "password": password})),
        )
        .await
        .map(drop)
    }

    pub async fn create_external_user(&self, username: &str, password: &str) -> TestResult {
        self.call(
            reqwest::Method::POST,
            "/_standin/users",
            Some(json!({"username": username, "password": password, "external": true})),
        )
        .await
        .map(drop)
    }

    /// Creates an application; returns (client_id, client_secret).
    pub async fn create_app(
        &self,
        name: &str,
        grant_type: &str,
        owner: &str,
    ) -> Result<(String, String), String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/_standin/applications",
                Some(json!({"name": name, "client_type": "confidential",
                    "grant_type": grant_type, "user": owner})),
            )
            .await?;
        Ok((
            v["client_id"].as_str().unwrap_or_default().to_string(),
            v["client_secret"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// Creates a confidential authorization-code application redirecting to `redirect_uri`;
    /// returns (client_id, client_secret).
    pub async fn create_code_app(
        &self,
        name: &str,
        redirect_uri: &str,
    ) -> Result<(String, String), String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/_standin/applications",
                Some(json!({"name": name, "client_type": "confidential",
                    "grant_type": "authorization-code", "redirect_uris": [redirect_uri]})),
            )
            .await?;
        Ok((
            v["client_id"].as_str().unwrap_or_default().to_string(),
            v["client_secret"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// The stand-in's listing of `user`'s access and refresh tokens (never a value).
    async fn token_listing(&self, user: &str) -> Result<Value, String> {
        self.call(
            reqwest::Method::GET,
            &format!("/_standin/tokens?user={user}"),
            None,
        )
        .await
    }

    /// The live access tokens of `user` as the stand-in lists them (sha256, application,
    /// description; never a value).
    pub async fn live_token_rows(&self, user: &str) -> Result<Vec<Value>, String> {
        let v = self.token_listing(user).await?;
        Ok(v["access_tokens"].as_array().cloned().unwrap_or_default())
    }

    /// The refresh tokens of `user` as the stand-in lists them (sha256, revoked, expired).
    pub async fn refresh_token_rows(&self, user: &str) -> Result<Vec<Value>, String> {
        let v = self.token_listing(user).await?;
        Ok(v["refresh_tokens"].as_array().cloned().unwrap_or_default())
    }

    /// sha256 of the live access tokens of `user`.
    pub async fn live_tokens(&self, user: &str) -> Result<Vec<String>, String> {
        let v = self.token_listing(user).await?;
        Ok(v["access_tokens"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["sha256"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Deletes `token` in AWX as its user would (`DELETE /api/v2/tokens/N/` with Basic auth),
    /// behind the operator's back.
    pub async fn delete_token_as_user(
        &self,
        token: &str,
        user: &str,
        password: &str,
    ) -> TestResult {
        let v = self.token_listing(user).await?;
        let digest = sha256_hex(token);
        let id = v["access_tokens"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["sha256"] == digest.as_str()))
            .and_then(|t| t["id"].as_u64())
            .ok_or("the token is not alive at the stand-in")?;
        self.delete_token_id_as_user(id, user, password).await
    }

    /// Deletes access token `id` (a row of [`Standin::live_token_rows`]) in AWX as its user
    /// would, behind the operator's back.
    pub async fn delete_token_id_as_user(&self, id: u64, user: &str, password: &str) -> TestResult {
        let path = if self.mode == "gateway" {
            format!("/api/gateway/v1/tokens/{id}/")
        } else {
            format!("/api/v2/tokens/{id}/")
        };
        let resp = self
            .http
            .delete(format!("{}{path}", self.url))
            .basic_auth(user, Some(password))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        ensure!(
            resp.status().as_u16() == 204,
            "DELETE {path} answered {}",
            resp.status()
        );
        Ok(())
    }

    pub async fn requests(&self) -> Result<Vec<Value>, String> {
        let v = self
            .call(reqwest::Method::GET, "/_standin/requests", None)
            .await?;
        Ok(v["requests"].as_array().cloned().unwrap_or_default())
    }

    /// Requests made on behalf of `user` (by username in the grant or Basic auth).
    pub async fn requests_for(&self, user: &str) -> Result<Vec<Value>, String> {
        Ok(self
            .requests()
            .await?
            .into_iter()
            .filter(|r| r["user"] == user)
            .collect())
    }

    pub async fn set_lifetimes(&self, access: Option<u64>, refresh: Option<u64>) -> TestResult {
        let mut body = serde_json::Map::new();
        if let Some(a) = access {
            body.insert("access_token_expire_seconds".into(), json!(a));
        }
        if let Some(r) = refresh {
            body.insert("refresh_token_expire_seconds".into(), json!(r));
        }
        self.call(
            reqwest::Method::PUT,
            "/_standin/settings",
            Some(Value::Object(body)),
        )
        .await
        .map(drop)
    }

    /// Cost (PBKDF2 iterations) of the password hashes made from now on; by default Django's
    /// 600000, which makes each password check cost AWX about 0.3 s of CPU.
    pub async fn set_password_cost(&self, iterations: u64) -> TestResult {
        self.call(
            reqwest::Method::PUT,
            "/_standin/settings",
            Some(json!({"password_hash_iterations": iterations})),
        )
        .await
        .map(drop)
    }

    pub async fn set_fault(&self, fault: Value) -> TestResult {
        self.call(reqwest::Method::PUT, "/_standin/faults", Some(fault))
            .await
            .map(drop)
    }

    pub async fn clear_faults(&self) -> TestResult {
        self.call(reqwest::Method::DELETE, "/_standin/faults", None)
            .await
            .map(drop)
    }

    /// GET /api/v2/me/ (or the gateway's) with the token: Some(username) when AWX accepts it.
    pub async fn whoami(&self, token: &str) -> Result<Option<String>, String> {
        let path = if self.mode == "gateway" {
            "/api/gateway/v1/me/"
        } else {
            "/api/v2/me/"
        };
        // django-ansible-base records `last_used` after the request commits; when a refresh
        // deletes the token in between, that update finds no row and the answer is a 500.
        // Asked again, the token is gone (401).
        let mut answers = Vec::new();
        for _ in 0..3 {
            let resp = self
                .http
                .get(format!("{}{path}", self.url))
                .bearer_auth(token)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            match resp.status().as_u16() {
                200 => {
                    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
                    return Ok(v["results"][0]["username"].as_str().map(str::to_string));
                }
                401 => return Ok(None),
                500 if self.mode == "gateway" => answers.push(500),
                s => return Err(format!("whoami answered {s}")),
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Err(format!("whoami answered {answers:?}"))
    }
}

/// One operator process, watching one namespace, logging at debug level to a file.
pub struct Operator {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
    namespace: String,
    args: Vec<String>,
    kubeconfig: PathBuf,
    bin: PathBuf,
    /// Extra environment variables of the process.
    vars: Vec<(String, String)>,
}

impl Operator {
    fn start(env: &Env, namespace: &str, extra: &[&str], log: PathBuf) -> Result<Operator, String> {
        let mut op = Operator::new(env, namespace, extra, log, &env.kubeconfig, &[]);
        op.spawn()?;
        Ok(op)
    }

    /// An operator process not started yet.
    fn new(
        env: &Env,
        namespace: &str,
        extra: &[&str],
        log: PathBuf,
        kubeconfig: &Path,
        vars: &[(String, String)],
    ) -> Operator {
        Operator {
            child: None,
            port: free_port(),
            log,
            namespace: namespace.to_string(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            kubeconfig: kubeconfig.to_path_buf(),
            bin: env.operator_bin.clone(),
            vars: vars.to_vec(),
        }
    }

    fn spawn(&mut self) -> TestResult {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        // Short backoffs keep scenarios quick, unless a scenario measures the real ones.
        let mut backoff = Vec::new();
        for (flag, value) in [("--backoff-base", "1s"), ("--backoff-max", "8s")] {
            if !self.args.iter().any(|a| a == flag) {
                backoff.extend([flag, value]);
            }
        }
        // An empty namespace: the operator watches every namespace.
        let watch: &[&str] = if self.namespace.is_empty() {
            &[]
        } else {
            &["--namespace", &self.namespace]
        };
        let child = Command::new(&self.bin)
            .arg("run")
            .args(watch)
            .args(["--http-addr", &format!("127.0.0.1:{}", self.port)])
            .args(&backoff)
            .args(&self.args)
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "RUST_LOG",
                "debug,hyper=info,tower=info,rustls=info,h2=info,kube_client=info",
            )
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start the operator: {e}"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Process id while running (the scale benchmark reads its memory).
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> TestResult {
        self.kill();
        self.spawn()
    }

    /// SIGTERM, then waits (at most 30 s) for the process to exit; returns how long it took.
    pub async fn terminate(&mut self) -> Result<Duration, String> {
        let Some(mut child) = self.child.take() else {
            return Err("operator not running".into());
        };
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        ensure!(status.success(), "kill -TERM failed");
        while started.elapsed() < Duration::from_secs(30) {
            if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        Err("operator did not exit within 30 s of SIGTERM".into())
    }

    /// Value of one sample (name with labels, as printed) in /metrics.
    pub async fn metric(&self, sample: &str) -> Result<Option<f64>, String> {
        let text = self.metrics().await?;
        Ok(text.lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        }))
    }

    pub async fn metrics(&self) -> Result<String, String> {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Outcome of a kubectl or helm run.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `tool` (helm or kubectl from the tools dir) as the identity of `kubeconfig`.
/// Runs kubectl or helm from the tools dir as `kubeconfig`'s user, with `stdin`.
pub fn run_tool(
    env: &Env,
    tool: &str,
    kubeconfig: &Path,
    args: &[&str],
    stdin: &str,
) -> Result<Run, String> {
    let helm_home = env.run_dir.join("helm");
    let mut child = Command::new(env.tools_bin.join(tool))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        // Helm's cache and configuration stay in the run dir, out of the user's home.
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{tool}: {e}"))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok(Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
