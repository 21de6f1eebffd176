//! spec.renewal.verifyEvery end to end: a token deleted in AWX behind the operator's back is
//! replaced within verifyEvery plus one reconcile, with a Warning event and a counter; a 5xx
//! during a verification does not make the AwxToken look broken; the last verification
//! survives an operator restart.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    scenarios::{poke_and_wait_for_a_look, setup_with, wait_ready, wait_token},
    support::{Env, Operator, TestResult, condition, wait_for},
};

async fn verifications(op: &Operator, outcome: &str) -> Result<f64, String> {
    Ok(op
        .metric(&format!(
            "awx_token_operator_verifications_total{{outcome=\"{outcome}\"}}"
        ))
        .await?
        .unwrap_or(0.0))
}

fn verified_at(obj: &Value) -> Option<String> {
    obj["status"]["verifiedAt"].as_str().map(str::to_string)
}

pub async fn verify_every_replaces_a_token_deleted_in_awx_and_shrugs_off_a_500(
    env: Arc<Env>,
) -> TestResult {
    let awx = env.private_standin("verify", "awx")?;
    let mut s = setup_with(&env, "e2e-verify", awx, &[]).await?;
    let ns = s.ns.clone();
    let (_, first) = s
        .issue(
            &env,
            "v",
            "creds",
            json!({"renewal": {"verifyEvery": "10s"}}),
        )
        .await?;
    let obj = wait_for("a first verification", Duration::from_secs(60), || async {
        Ok(env
            .awx_token(&ns, "v")
            .await?
            .filter(|o| verified_at(o).is_some()))
    })
    .await?;
    let first_verified = verified_at(&obj).unwrap_or_default();
    let valid = verifications(&s.op, "valid").await?;
    ensure!(
        (1.0..).contains(&valid),
        "valid verifications counted: {valid}"
    );

    // AWX answers 500 to the verification: counted as an error, nothing looks broken.
    s.awx
        .set_fault(json!({"mode": "status500", "paths": ["/api/v2/me/"]}))
        .await?;
    wait_for(
        "a verification that got a 500",
        Duration::from_secs(60),
        || async { Ok((verifications(&s.op, "error").await? >= 1.0).then_some(())) },
    )
    .await?;
    s.awx.clear_faults().await?;
    let obj = env.awx_token(&ns, "v").await?.ok_or("gone")?;
    let ready = condition(&obj, "Ready").ok_or("no Ready condition")?;
    ensure_eq!(
        (ready.0.as_str(), ready.1.as_str()),
        ("True", "TokenReady"),
        "Ready after a 500 to a verification"
    );
    ensure_eq!(
        env.secret_value(&ns, "v", "token").await?,
        Some(first.clone()),
        "the Secret keeps its token after a 500"
    );
    ensure_eq!(
        verifications(&s.op, "rejected").await?,
        0.0,
        "a 500 is not a rejection"
    );

    // The last verification is in the state: an operator restart does not forget it.
    let before = verified_at(&env.awx_token(&ns, "v").await?.ok_or("gone")?);
    s.op.restart()?;
    poke_and_wait_for_a_look(&env, &ns, "v", "after-restart").await?;
    let after = verified_at(&env.awx_token(&ns, "v").await?.ok_or("gone")?);
    ensure!(
        after.is_some() && after >= before && before.as_deref() >= Some(first_verified.as_str()),
        "verifiedAt across a restart: {before:?} then {after:?}"
    );

    // Deleted in AWX behind the operator's back: found at the next verification, replaced.
    s.awx
        .delete_token_as_user(&first, &s.user, &s.password)
        .await?;
    let deleted = Instant::now();
    let second = wait_token(&env, &ns, "v", Some(&first)).await?;
    let took = deleted.elapsed();
    env.remember_secret(&second);
    println!("    a token deleted in AWX was replaced after {took:.1?} (verifyEvery 10s)");
    ensure!(
        took.as_secs() < 10 + 15,
        "replaced {took:?} after the deletion: verifyEvery is 10 s"
    );
    ensure_eq!(
        s.awx.whoami(&second).await?,
        Some(s.user.clone()),
        "the replacement works"
    );
    ensure_eq!(
        verifications(&s.op, "rejected").await?,
        1.0,
        "rejections counted"
    );
    let events: Value =
        serde_json::from_str(&env.kubectl(&["get", "events", "-n", &ns, "-o", "json"])?)
            .map_err(|e| e.to_string())?;
    ensure!(
        events["items"].as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["reason"] == "TokenRejected" && e["type"] == "Warning")),
        "a TokenRejected Warning event"
    );
    wait_ready(&env, &ns, "v", "True", Some("TokenReady")).await?;
    Ok(())
}

/// Seconds between two RFC 3339 times of a status (stored to the second).
fn seconds_between(obj: &Value, from: &str, to: &str) -> Result<f64, String> {
    let at = |field: &str| -> Result<f64, String> {
        obj["status"][field]
            .as_str()
            .ok_or_else(|| format!("no status.{field}"))?
            .parse::<jiff::Timestamp>()
            .map(|t| t.as_millisecond() as f64 / 1000.0)
            .map_err(|e| e.to_string())
    };
    Ok(at(to)? - at(from)?)
}

/// renewBefore, renewBeforePercentage and refreshTokenLifetime each set the renewal time the
/// status reports (less the jitter: at most a tenth of the time to it), and the renewal then
/// happens: against an AWX whose access tokens live 60 s.
pub async fn renewal_before_expiry_percentage_and_refresh_lifetime_set_the_renewal(
    env: Arc<Env>,
) -> TestResult {
    let awx = env.private_standin("schedule", "awx")?;
    awx.set_lifetimes(Some(60), None).await?;
    let s = setup_with(&env, "e2e-schedule", awx, &[]).await?;
    let ns = s.ns.clone();
    let cases = [
        ("fixed", json!({"renewBefore": "45s"})),
        ("share", json!({"renewBeforePercentage": 50})),
        (
            "refresh",
            json!({"strategy": "Refresh", "refreshTokenLifetime": "20s"}),
        ),
    ];
    let mut tokens = Vec::new();
    for (name, renewal) in &cases {
        let (_, token) = s
            .issue(
                &env,
                name,
                &format!("creds-{name}"),
                json!({"renewal": renewal}),
            )
            .await?;
        tokens.push(token);
    }
    for ((name, _), token) in cases.iter().zip(&tokens) {
        let obj = env.awx_token(&ns, name).await?.ok_or("gone")?;
        // issuedAt is when the operator recorded the token (after its grant and tagging),
        // AWX's expiry counts from AWX's creation: a little under 60 s apart.
        let lifetime = seconds_between(&obj, "issuedAt", "expiresAt")?;
        ensure!(
            (55.0..=61.0).contains(&lifetime),
            "{name}: AWX's lifetime {lifetime} s"
        );
        // Seconds from the issue to the renewal, before the jitter.
        let after = match *name {
            "fixed" => lifetime - 45.0,
            "share" => lifetime * 0.5,
            _ => {
                let dies = seconds_between(&obj, "issuedAt", "refreshTokenExpiresAt")?;
                ensure!(
                    (19.0..=21.0).contains(&dies),
                    "refresh token dies {dies} s after the issue (refreshTokenLifetime 20s)"
                );
                dies - 2.0
            }
        };
        let renews = seconds_between(&obj, "issuedAt", "renewalTime")?;
        // Times are stored to the second: one second either way, and the jitter below.
        ensure!(
            (after - after / 10.0 - 1.0..=after + 1.0).contains(&renews),
            "{name}: renewal {renews} s after the issue, expected {after} s less up to a tenth"
        );
        let renewed = wait_token(&env, &ns, name, Some(token)).await?;
        env.remember_secret(&renewed);
        if *name == "refresh" {
            // A refresh kills the token it replaces at once, and this one renews every 18 s:
            // by the time it is tried, the Secret may hold the next one. The renewal works if
            // the Secret's token, whichever renewal it is, does.
            wait_for(
                "the refreshed Secret's token to work",
                Duration::from_secs(30),
                || async {
                    let now = env.secret_value(&ns, name, "token").await?;
                    let Some(now) = now.filter(|t| t != token) else {
                        return Ok(None);
                    };
                    env.remember_secret(&now);
                    let works = s.awx.whoami(&now).await? == Some(s.user.clone());
                    Ok(works.then_some(()))
                },
            )
            .await?;
            continue;
        }
        ensure_eq!(
            s.awx.whoami(&renewed).await?,
            Some(s.user.clone()),
            "{name}: the renewed token works"
        );
    }
    let events: Value =
        serde_json::from_str(&env.kubectl(&["get", "events", "-n", &ns, "-o", "json"])?)
            .map_err(|e| e.to_string())?;
    for (name, reason) in [
        ("fixed", "TokenRenewed"),
        ("share", "TokenRenewed"),
        ("refresh", "TokenRefreshed"),
    ] {
        ensure!(
            events["items"].as_array().is_some_and(|a| a
                .iter()
                .any(|e| { e["involvedObject"]["name"] == name && e["reason"] == reason })),
            "{name}: a {reason} event"
        );
    }
    Ok(())
}
