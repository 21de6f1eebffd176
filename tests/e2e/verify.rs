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
