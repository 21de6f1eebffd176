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

/// Crash torture: AwxTokens rotating every few seconds while the operator is SIGKILLed at
/// random moments, over and over. Personal tokens must never leak (each request is tagged and
/// an interrupted one is found and deleted); OAuth2 password-grant tokens can leak in one
/// window (between AWX's answer and the state write): their leaks are counted and reported.
pub async fn crash_torture_kills_never_break_or_leak_tokens(env: Arc<Env>) -> TestResult {
    let awx = env.private_standin("torture", "awx")?;
    // 16 personal tokens rotating every 3 s need ~11 password checks a second (Basic auth to
    // create and to delete), more than AWX's default hashing cost (~0.3 s of CPU each) allows
    // on 2 cores: this scenario is about crashes, not AWX's capacity, so its users get cheap
    // hashes (set before setup creates the first user).
    awx.set_password_cost(1000).await?;
    let mut s = setup_with(&env, "e2e-torture", awx, &[]).await?;
    let kills: usize = std::env::var("AWXTO_TORTURE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    // 16 personal tokens and 4 password-grant tokens, each for its own AWX user.
    let mut objects = Vec::new();
    for i in 0..20 {
        let name = format!("t{i:02}");
        let user = format!("{}-{name}", s.ns);
        s.awx.create_user(&user, &s.password).await?;
        let creds = format!("{name}-creds");
        let grant = if i < 16 {
            "PersonalAccessToken"
        } else {
            "Password"
        };
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
        env.apply(&awx_token(
            &s.ns,
            &name,
            &s.awx.url,
            grant,
            &creds,
            json!({"renewal": {"rotateEvery": "3s", "revokeGracePeriod": "2s"}}),
        ))?;
        objects.push((name, user, creds, grant));
    }
    for (name, ..) in &objects {
        wait_ready(&env, &s.ns, name, "True", None).await?;
    }

    // Sampler: every Secret always holds a token AWX accepts as its user.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (env, stop, awx, ns) = (env.clone(), stop.clone(), s.awx.clone(), s.ns.clone());
        let objects: Vec<(String, String)> = objects
            .iter()
            .map(|(n, u, ..)| (n.clone(), u.clone()))
            .collect();
        tokio::spawn(async move {
            let mut samples = 0usize;
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::SeqCst) {
                for (name, user) in &objects {
                    let token = env.secret_value(&ns, name, "token").await?;
                    let Some(token) = token.filter(|t| !t.is_empty()) else {
                        return Err(format!("{name}: Secret missing or empty"));
                    };
                    match awx.whoami(&token).await? {
                        Some(u) if &u == user => {}
                        // The Secret may have been updated (and the old token revoked after
                        // its grace period) between reading it and asking AWX: read again.
                        other => {
                            let again = env
                                .secret_value(&ns, name, "token")
                                .await?
                                .unwrap_or_default();
                            if again == token {
                                return Err(format!(
                                    "{name}: the token in the Secret does not work ({other:?})"
                                ));
                            }
                        }
                    }
                    seen.insert(sha256_hex(&token));
                    samples += 1;
                }
            }
            Ok::<(usize, usize), String>((samples, seen.len()))
        })
    };

    let started = Instant::now();
    for k in 0..kills {
        // Pseudo-random but reproducible moments: 150 ms to 1.35 s apart.
        let wait = 150 + (sha256_hex(&k.to_string()).as_bytes()[0] as u64 % 12) * 100;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        s.op.restart()?;
    }
    let torture_time = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (samples, distinct) = sampler.await.map_err(|e| e.to_string())??;

    // Settle: stop rotating, let grace periods pass, then compare AWX with the Secrets.
    for (name, _, creds, grant) in &objects {
        env.apply(&awx_token(
            &s.ns,
            name,
            &s.awx.url,
            grant,
            creds,
            json!({"renewal": {"rotateEvery": "1h", "revokeGracePeriod": "2s"}}),
        ))?;
    }
    let mut oauth_leaks = 0;
    for (name, user, _, grant) in &objects {
        let settled = wait_for(
            &format!("{name} settled"),
            Duration::from_secs(90),
            || async {
                let obj = env.awx_token(&s.ns, name).await?.unwrap_or_default();
                let ready = condition(&obj, "Ready").is_some_and(|c| c.0 == "True");
                let pending = obj["status"]["pendingRevocations"].as_u64().unwrap_or(0);
                Ok((ready && pending == 0).then_some(()))
            },
        )
        .await;
        settled?;
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
        ensure!(
            live.contains(&sha256_hex(&current)),
            "{name}: the Secret's token is not alive"
        );
        let extra = live.len() - 1;
        if *grant == "PersonalAccessToken" {
            ensure_eq!(extra, 0, "{name}: personal tokens leaked");
        } else {
            oauth_leaks += extra;
        }
    }
    let created = s
        .awx
        .requests()
        .await?
        .iter()
        .filter(|r| matches!(r["status"].as_u64(), Some(200 | 201)) && r["method"] == "POST")
        .count();
    println!(
        "    {kills} SIGKILLs in {:.0}s; {samples} samples of {distinct} distinct tokens, all working; \
         {created} tokens created; personal-token leaks 0; password-grant leaks {oauth_leaks} (4 objects)",
        torture_time.as_secs_f64()
    );
    Ok(())
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
