//! Faults: the operator SIGKILLed at random moments, the API server restarted under it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{
    scenarios::{awx_token, setup_with, wait_ready, wait_token},
    support::{Env, TestResult, condition, repo_root, sha256_hex, wait_for},
};

/// Crash torture, Controller flavour.
pub async fn crash_torture_kills_never_break_or_leak_tokens(env: Arc<Env>) -> TestResult {
    crash_torture(env, "awx", "e2e-torture").await
}

/// Crash torture, Gateway flavour (the gateway's own OAuth2 code).
pub async fn crash_torture_gateway_kills_never_break_or_leak_tokens(env: Arc<Env>) -> TestResult {
    crash_torture(env, "gateway", "e2e-torture-gw").await
}

/// How long the stand-in holds each committed token answer back: the window between AWX's
/// commit and the operator's state write, widened so that kills land in it.
const ANSWER_DELAY: f64 = 0.4;

/// AwxTokens of every grant AWX can list (personal tokens; password grants renewed by
/// reissue and by refresh), rotating every few seconds while the operator is SIGKILLed at
/// random moments, over and over, with AWX's answers to token requests delayed after their
/// commit. Every Secret always holds a working token, and once the operator has looked for
/// the tokens of interrupted requests, AWX holds no token the Secrets do not.
async fn crash_torture(env: Arc<Env>, mode: &str, ns: &str) -> TestResult {
    let awx = env.private_standin(&format!("torture-{mode}"), mode)?;
    // About 10 password checks a second (Basic auth to create, list, tag and delete): more
    // than AWX's default hashing cost allows on 2 cores. This scenario is about crashes, not
    // AWX's capacity: cheap hashes (set before setup creates the first user).
    awx.set_password_cost(1000).await?;
    let mut s = setup_with(&env, ns, awx, &[]).await?;
    let kills: usize = std::env::var("AWXTO_TORTURE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // Each object for its own AWX user: a user's live tokens are then exactly one object's.
    let kinds = [
        ("PersonalAccessToken", "Reissue"),
        ("Password", "Reissue"),
        ("Password", "Refresh"),
    ];
    let mut objects = Vec::new();
    for i in 0..12 {
        let name = format!("t{i:02}");
        let user = format!("{}-{name}", s.ns);
        s.awx.create_user(&user, &s.password).await?;
        let creds = format!("{name}-creds");
        let (grant, strategy) = kinds[i % kinds.len()];
        if grant == "Password" {
            let (id, secret) = s.awx.create_app(&user, "password", &user).await?;
            env.credentials(
                &s.ns,
                &creds,
                &[
                    ("username", &user),
                    ("password", &s.password),
                    ("client_id", &id),
                    ("client_secret", &secret),
                ],
            )?;
        } else {
            env.credentials(
                &s.ns,
                &creds,
                &[("username", &user), ("password", &s.password)],
            )?;
        }
        let renewal = |every: &str| json!({"renewal": {"rotateEvery": every, "revokeGracePeriod": "2s", "strategy": strategy}});
        env.apply(&awx_token(
            &s.ns,
            &name,
            &s.awx.url,
            grant,
            &creds,
            renewal("3s"),
        ))?;
        objects.push((name, user, creds, grant, strategy));
    }
    for (name, ..) in &objects {
        wait_ready(&env, &s.ns, name, "True", None).await?;
    }
    // The token endpoint (grants and refreshes, whose tokens are untagged until after the
    // answer). Personal tokens carry their tag from the start; holding back the listings
    // too would only slow every search.
    let token_paths: Vec<&str> = if mode == "gateway" {
        vec!["/o/token/"]
    } else {
        vec!["/api/o/token/"]
    };
    s.awx
        .set_fault(
            json!({"mode": "delay_after", "delay_seconds": ANSWER_DELAY, "paths": token_paths}),
        )
        .await?;

    // Sampler: every Secret always holds a token AWX accepts as its user.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (env, stop, awx, ns) = (env.clone(), stop.clone(), s.awx.clone(), s.ns.clone());
        let objects: Vec<(String, String, bool)> = objects
            .iter()
            .map(|(n, u, _, _, strategy)| (n.clone(), u.clone(), *strategy == "Refresh"))
            .collect();
        tokio::spawn(async move {
            let mut samples = 0usize;
            let mut seen = BTreeSet::new();
            // The longest a Refresh object's Secret held a token its refresh had replaced.
            let mut dead = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                for (name, user, refresh) in &objects {
                    let token = env.secret_value(&ns, name, "token").await?;
                    let Some(token) = token.filter(|t| !t.is_empty()) else {
                        return Err(format!("{name}: Secret missing or empty"));
                    };
                    match awx.whoami(&token).await? {
                        Some(u) if &u == user => {}
                        // The Secret may have been updated (and the old token revoked: after
                        // its grace period, or at once by a refresh) between reading it and
                        // asking AWX: read again.
                        other => {
                            let again = env
                                .secret_value(&ns, name, "token")
                                .await?
                                .unwrap_or_default();
                            if again == token && !*refresh {
                                return Err(format!(
                                    "{name}: the token in the Secret does not work ({other:?})"
                                ));
                            }
                            // A refresh revokes the token it replaces at once (AWX's refresh
                            // grant), before the Secret can change, and a kill may follow it:
                            // the dead token must be replaced soon.
                            if again == token {
                                let since = Instant::now();
                                while env.secret_value(&ns, name, "token").await?.as_deref()
                                    == Some(token.as_str())
                                {
                                    // Kills keep coming every second or so: a renewal
                                    // may need several lives to finish.
                                    if since.elapsed() > Duration::from_secs(60) {
                                        return Err(format!(
                                            "{name}: the Secret kept a dead token for 60 s \
                                             ({other:?})"
                                        ));
                                    }
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                dead = dead.max(since.elapsed());
                            }
                        }
                    }
                    seen.insert(sha256_hex(&token));
                    samples += 1;
                }
            }
            Ok::<(usize, usize, Duration), String>((samples, seen.len(), dead))
        })
    };

    let started = Instant::now();
    let mut kill_times = Vec::new();
    for k in 0..kills {
        // Pseudo-random but reproducible moments: 150 ms to 1.35 s apart.
        let wait = 150 + (sha256_hex(&k.to_string()).as_bytes()[0] as u64 % 12) * 100;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        kill_times.push(epoch_now());
        s.op.restart()?;
    }
    let torture_time = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (samples, distinct, dead) = sampler.await.map_err(|e| e.to_string())??;
    s.awx.clear_faults().await?;

    // Kills inside a window: while a token request AWX had committed was held back.
    let requests = s.awx.requests().await?;
    let committed: Vec<f64> = requests
        .iter()
        .filter(|r| r["method"] == "POST" && matches!(r["status"].as_u64(), Some(200 | 201)))
        .filter(|r| {
            token_paths
                .iter()
                .any(|p| r["path"].as_str().is_some_and(|x| x.starts_with(p)))
        })
        .filter_map(|r| r["time"].as_f64())
        .collect();
    let in_window = kill_times
        .iter()
        .filter(|k| {
            committed
                .iter()
                .any(|t| *t <= **k && **k <= t + ANSWER_DELAY + 0.05)
        })
        .count();

    // Settle: stop rotating, let grace periods pass and the searches for the tokens of
    // interrupted requests finish (the last one when AWX can no longer be finishing them,
    // about two minutes after they started), then compare AWX with the Secrets.
    for (name, _, creds, grant, strategy) in &objects {
        env.apply(&awx_token(
            &s.ns,
            name,
            &s.awx.url,
            grant,
            creds,
            json!({"renewal": {"rotateEvery": "1h", "revokeGracePeriod": "2s", "strategy": strategy}}),
        ))?;
    }
    let mut per_kind: BTreeMap<String, usize> = BTreeMap::new();
    for (name, user, _, grant, strategy) in &objects {
        wait_for(
            &format!("{name} settled"),
            Duration::from_secs(240),
            || async {
                let obj = env.awx_token(&s.ns, name).await?.unwrap_or_default();
                // Written by a reconcile that began after the kills ended (the settling
                // spec came after them), not one the last kill cut short.
                let current = obj["status"]["observedGeneration"] == obj["metadata"]["generation"];
                let ready = current && condition(&obj, "Ready").is_some_and(|c| c.0 == "True");
                let cleanup = condition(&obj, "CleanupPending").is_some_and(|c| c.0 == "True");
                let pending = obj["status"]["pendingRevocations"].as_u64().unwrap_or(0);
                Ok((ready && !cleanup && pending == 0).then_some(()))
            },
        )
        .await?;
        let current = env
            .secret_value(&s.ns, name, "token")
            .await?
            .unwrap_or_default();
        ensure_eq!(
            s.awx.whoami(&current).await?,
            Some(user.clone()),
            "{name}: final token works"
        );
        let live = s.awx.live_tokens(user).await?;
        ensure_eq!(
            live,
            vec![sha256_hex(&current)],
            "{name} ({grant}, {strategy}): AWX holds exactly the Secret's token"
        );
        *per_kind.entry(format!("{grant}/{strategy}")).or_default() += 1;
    }
    // The tokens the operator found and deleted after interrupted requests.
    let events: serde_json::Value = serde_json::from_str(&env.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &s.ns,
        "-o",
        "json",
    ])?)
    .map_err(|e| e.to_string())?;
    let events = events["items"].as_array().cloned().unwrap_or_default();
    // Repeated events are counted in a series.
    let times = |e: &serde_json::Value| e["series"]["count"].as_u64().unwrap_or(1) as usize;
    let cleaned: usize = events
        .iter()
        .filter(|e| e["reason"] == "InterruptedIssueCleaned")
        .filter_map(|e| {
            // "Found and deleted N token(s) of a request whose answer was lost"
            let n = e["note"]
                .as_str()?
                .split_whitespace()
                .nth(3)?
                .parse::<usize>()
                .ok()?;
            Some(n * times(e))
        })
        .sum();
    let warned: usize = events
        .iter()
        .filter(|e| e["reason"] == "InterruptedIssue")
        .map(times)
        .sum();
    ensure_eq!(warned, 0, "no interrupted request was left to a person");
    println!(
        "    {mode}: {kills} SIGKILLs in {:.0}s, {in_window} inside a commit-to-state window; \
         {samples} samples of {distinct} distinct tokens, all working; {} tokens created; \
         {cleaned} found and deleted after interrupted requests; leaks 0 ({per_kind:?}); a \
         refreshed-away token stayed in a Secret at most {:.1}s",
        torture_time.as_secs_f64(),
        committed.len(),
        dead.as_secs_f64(),
    );
    Ok(())
}

fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The API server restarts under a running operator: watches recover, renewals go on.
pub async fn serial_apiserver_restart_is_survived(env: Arc<Env>) -> TestResult {
    let awx = env.standin("awx")?;
    let s = setup_with(&env, "e2e-apiserver", awx, &[]).await?;
    s.password_credentials(&env, "creds").await?;
    env.apply(&awx_token(
        &s.ns,
        "a",
        &s.awx.url,
        "Password",
        "creds",
        json!({"renewal": {"rotateEvery": "4s", "revokeGracePeriod": "1s"}}),
    ))?;
    wait_ready(&env, &s.ns, "a", "True", None).await?;
    let status = std::process::Command::new("bash")
        .arg(repo_root().join("tests/env/cluster.sh"))
        .arg("restart-apiserver")
        .arg(&env.run_dir)
        .status()
        .map_err(|e| e.to_string())?;
    ensure!(status.success(), "restart-apiserver failed");
    let after_restart = wait_token(&env, &s.ns, "a", None).await?;
    let mut token = after_restart;
    let mut renewals = BTreeMap::new();
    for round in 0..2 {
        token = wait_token(&env, &s.ns, "a", Some(&token)).await?;
        ensure_eq!(
            s.awx.whoami(&token).await?,
            Some(s.user.clone()),
            "renewal {round} after the restart"
        );
        renewals.insert(round, token.clone());
    }
    // A change of credentials is still noticed: the Secret watch came back too.
    let other = format!("{}-b", s.ns);
    s.awx.create_user(&other, "second-password").await?;
    let (id, secret) = s.awx.create_app(&other, "password", &other).await?;
    env.credentials(
        &s.ns,
        "creds",
        &[
            ("username", &other),
            ("password", "second-password"),
            ("client_id", &id),
            ("client_secret", &secret),
        ],
    )?;
    wait_for(
        "a token for the new user",
        Duration::from_secs(60),
        || async {
            let t = env
                .secret_value(&s.ns, "a", "token")
                .await?
                .unwrap_or_default();
            Ok((s.awx.whoami(&t).await.ok().flatten() == Some(other.clone())).then_some(()))
        },
    )
    .await?;
    Ok(())
}
