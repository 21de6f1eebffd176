//! What the operator must remember about the tokens of one AwxToken between reconciles and
//! across restarts: the current token (so it can be refreshed, verified and revoked) and the
//! replaced tokens waiting out their grace period. It lives in an operator-owned Secret,
//! never in status.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{
    awx::{ClientCredentials, Flavor, RevocationCredentials, TokenKind, TokenToRevoke},
    crd::WorkloadKind,
};

/// A secret string that serialises as itself (it is stored in a Secret) but never prints.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sensitive(String);

impl Sensitive {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn to_secret(&self) -> secrecy::SecretString {
        secrecy::SecretString::from(self.0.clone())
    }
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Everything kept about one AwxToken's tokens, and what must survive a restart about its
/// failures. Read fresh before every decision, written with a precondition on the version read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<HeldToken>,
    /// Replaced tokens, revoked once their grace period is over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<RetiringToken>,
    /// Written before a token is requested and cleared with the write that records the answer:
    /// found at the start of a reconcile, it means the request's process stopped in between
    /// (or, with two processes, that another one is asking right now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuing: Option<IssueIntent>,
    /// Requests whose outcome is unknown (interrupted, or an answer that never arrived whole):
    /// AWX may hold a token of each that nobody knows. Looked for, then forgotten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interrupted: Vec<IssueIntent>,
    /// The rotate annotation's value last acted on. Kept here, read fresh on every reconcile,
    /// not only in status: a reconcile working from a cached object whose status is not
    /// updated yet must not rotate a second time for the same value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_for: Option<String>,
    /// The last failed attempt to obtain a token, while no attempt has succeeded since. Kept
    /// here rather than in status or in the process: a restart, or a reconcile of a stale cached
    /// object, must not forget the backoff (AWX accounts can lock after wrong passwords).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureRecord>,
    /// A restart of spec.rolloutRestartTargets owed because the token in the Secret changed:
    /// recorded with the new token, before the Secret is written, and kept until every
    /// restarted workload finished its rollout (or the rollout timeout passed), so that a
    /// crash or a failed patch loses no restart, and replaced tokens wait for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartOwed>,
    /// Why the last rollout was given up on (its timeout passed); cleared by the next change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_timed_out: Option<String>,
    /// The browser sign-in of grant type AuthorizationCode, kept only here (never in the
    /// target Secret: a refresh kills its access token at once, so consumers get personal
    /// tokens created with it instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
}

/// A browser sign-in: the access and refresh token pair of the last refresh. The credentials
/// Secret's refresh token is consumed by the first refresh; the rotated one lives only here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub access_token: Sensitive,
    pub refresh_token: Sensitive,
    /// When the pair was issued: AWX counts the refresh token's lifetime from then.
    pub refreshed_at: Timestamp,
    /// Fingerprint of the inputs (including the hash of the Secret's refresh token) the
    /// sign-in started from: a new refresh token in the Secret is a new sign-in.
    pub inputs: String,
    /// The AWX user signed in, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// AWX answered 401 to the access token: refresh before using it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rejected: bool,
    /// The AWX base URL and the application the pair was issued by: a sign-in that is
    /// replaced, cannot be renewed or is deleted is revoked there, with that application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Sensitive>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
}

impl Session {
    /// The sign-in's pair as a token to revoke after `revoke_after`. Revoking its refresh
    /// token deletes its access token too (docs/awx-protocol.md#revoke-token), and the
    /// revocation is checked with the access token, so a pair whose refresh token is already
    /// dead (expired, revoked, used) is still seen to it that its access token dies.
    pub fn retire(&self, revoke_after: Timestamp) -> RetiringToken {
        RetiringToken {
            token: TokenRecord {
                url: self.url.clone(),
                client_id: self.client_id.clone(),
                client_secret: self.client_secret.clone(),
                access_token: self.access_token.clone(),
                refresh_token: Some(self.refresh_token.clone()),
                token_id: None,
                personal: false,
                gateway: self.gateway,
            },
            revoke_after,
            failed_attempts: 0,
            issued_at: Some(self.refreshed_at),
            clock_offset: None,
        }
    }
}

/// Restarts owed for one token change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestartOwed {
    /// When the new token was recorded (just before the Secret got it): a restart stamped at
    /// or after this time gives the pods the new token, whoever made it.
    pub since: Timestamp,
    /// Not before this (a failed attempt's backoff, or a workload's minimum interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<Timestamp>,
    /// Consecutive failed attempts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Why the last attempt failed (no secret values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set once every target is restarted: the rollouts waited for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted: Option<Restarted>,
    /// The late-rollout warning was given.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warned: bool,
}

/// Workloads restarted for one change, whose rollouts are waited for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Restarted {
    pub at: Timestamp,
    pub workloads: Vec<WorkloadRef>,
}

/// A workload, as the state remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    pub name: String,
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{}", self.kind, self.name)
    }
}

/// Consecutive failed attempts to obtain a token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureRecord {
    pub attempts: u32,
    pub at: Timestamp,
    /// When the first of these consecutive failures happened: how long obtaining a token has
    /// been failing (the renewal-failing alert), which the process must not forget on restart.
    /// Absent in records of earlier releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// Condition reason (`InvalidCredentials`, `AwxServerError`, ...).
    pub reason: String,
    /// What a person reads; never holds a secret value.
    pub message: String,
    /// Whether trying again unchanged may succeed; if not, only new inputs are tried.
    pub retryable: bool,
    /// Fingerprint of the inputs of the failed attempt: different inputs are tried at once.
    pub inputs: String,
    /// The rotate annotation's value when the attempt was made: a new value is tried at once,
    /// once; later attempts for it follow the backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
}

impl FailureRecord {
    /// The start of the streak; a record of an earlier release knows only its last failure.
    pub fn failing_since(&self) -> Timestamp {
        self.since.unwrap_or(self.at)
    }
}

/// A token request in flight, or one whose outcome is unknown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueIntent {
    /// Random tag put into a personal token's description, so it can be found and deleted.
    pub tag: String,
    pub started_at: Timestamp,
    pub personal: bool,
    pub gateway: bool,
    /// The request was a refresh (it may have rotated the refresh token away).
    #[serde(default)]
    pub refresh: bool,
    /// The operator process that made the request. Another process's marker may belong to a
    /// request still in flight, so it is waited out (up to the request timeout) before it is
    /// taken for interrupted.
    #[serde(default)]
    pub holder: String,
    /// The request's token carries the tag in its description from the start (personal
    /// tokens, application tokens created through the REST API); otherwise the tag is set
    /// after the answer, and a token whose answer was lost is found by its user, application
    /// and creation time instead.
    #[serde(default)]
    pub tagged: bool,
    /// Whose token it is, to look for it: the AWX user and the application (client id, and
    /// id where known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<u64>,
    /// AWX's clock minus this process's (seconds), as last measured from AWX's `Date`
    /// header: AWX's creation times are compared on its clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset: Option<i64>,
    /// Looked for once already (a second look catches a request AWX finished late).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub searched: bool,
    /// Why the last look failed, for the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_error: Option<String>,
    /// When a search by creation time last began (its claim on the state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at: Option<Timestamp>,
    /// Failed attempts to look for its token, and when to look again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub search_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_after: Option<Timestamp>,
}

impl IssueIntent {
    /// Whether AWX can be asked for the request's token: a personal token (by its tag), or an
    /// application token of a known user and application. A client-credentials request (no
    /// user) or an application request recorded by an earlier release can only be reported.
    pub fn searchable(&self) -> bool {
        self.personal || (self.username.is_some() && self.client_id.is_some())
    }
}

/// What identifies an issued token and where and how it is revoked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    /// The AWX base URL that issued it: revocation goes there even after spec.awx.url changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The OAuth2 application that issued it: revocation authenticates as that application,
    /// even after the credentials Secret names another one (or another AWX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Sensitive>,
    pub access_token: Sensitive,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Sensitive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<u64>,
    pub personal: bool,
    pub gateway: bool,
}

/// The token currently in the target Secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldToken {
    #[serde(flatten)]
    pub token: TokenRecord,
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub issued_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_issued_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    pub renewal_time: Timestamp,
    /// Fingerprint of everything the token was issued from (URL, grant, credentials); a
    /// change means the token must be re-issued.
    pub inputs: String,
    /// When AWX last confirmed the token (verifyEvery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Timestamp>,
    /// When a verification last failed to get an answer (a 5xx or timeout says nothing
    /// about the token); the next one waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_failed_at: Option<Timestamp>,
    /// When AWX rejected the token (deleted or revoked behind the operator's back): it is
    /// replaced with the grant and never reported Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_at: Option<Timestamp>,
    /// The refresh chain cannot be trusted (a refresh was refused, failed with a 5xx or was
    /// interrupted): the next renewal uses the grant.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh_broken: bool,
    /// AWX's clock minus this process's when the token was issued (seconds, from AWX's `Date`
    /// header), for comparing AWX's creation times with local ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset: Option<i64>,
    /// The id of its OAuth2 application in AWX's API, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_id: Option<u64>,
}

/// A replaced token waiting to be revoked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetiringToken {
    #[serde(flatten)]
    pub token: TokenRecord,
    /// Not revoked before this time: pods may still be using it (or, after a failed attempt,
    /// the next attempt).
    pub revoke_after: Timestamp,
    #[serde(default)]
    pub failed_attempts: u32,
    /// When it was issued (on this process's clock) and AWX's clock offset then, so that a
    /// search by creation time never takes it for a lost token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset: Option<i64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl HeldToken {
    /// This token as a replaced one, revocable after `revoke_after`.
    pub fn retire(&self, revoke_after: Timestamp) -> RetiringToken {
        RetiringToken {
            token: self.token.clone(),
            revoke_after,
            failed_attempts: 0,
            issued_at: Some(self.issued_at),
            clock_offset: self.clock_offset,
        }
    }
}

impl TokenRecord {
    pub fn flavor(&self) -> Flavor {
        if self.gateway {
            Flavor::Gateway
        } else {
            Flavor::Controller
        }
    }

    /// `fallback` with the issuing application's client credentials, when they are known.
    pub fn revocation(&self, fallback: &RevocationCredentials) -> RevocationCredentials {
        let client = match &self.client_id {
            Some(id) => Some(ClientCredentials {
                client_id: id.clone(),
                client_secret: self.client_secret.as_ref().map(Sensitive::to_secret),
            }),
            None => fallback.client.clone(),
        };
        RevocationCredentials {
            client,
            user: fallback.user.clone(),
            bearer: fallback.bearer.clone(),
        }
    }

    pub fn to_revoke(&self) -> TokenToRevoke {
        TokenToRevoke {
            access_token: self.access_token.to_secret(),
            refresh_token: self.refresh_token.as_ref().map(Sensitive::to_secret),
            token_id: self.token_id,
            kind: if self.personal {
                TokenKind::Personal
            } else {
                TokenKind::Application
            },
        }
    }
}

/// Key of the state Secret holding the JSON document.
pub const STATE_KEY: &str = "state.json";

impl TokenState {
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Earliest time a retiring token may be revoked.
    pub fn next_revocation(&self) -> Option<Timestamp> {
        self.retiring.iter().map(|r| r.revoke_after).min()
    }

    /// Every token value this state holds (current and retiring).
    pub fn holds(&self, access_token: &str) -> bool {
        self.current
            .iter()
            .map(|c| &c.token)
            .chain(self.retiring.iter().map(|r| &r.token))
            .any(|t| t.access_token.expose() == access_token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> HeldToken {
        HeldToken {
            token: TokenRecord {
                url: Some("https://awx.example.com/".into()),
                client_id: Some("app".into()),
                client_secret: Some(Sensitive::new("ClientSecret789")),
                access_token: Sensitive::new("AccessValue123"),
                refresh_token: Some(Sensitive::new("RefreshValue456")),
                token_id: None,
                personal: false,
                gateway: false,
            },
            scope: "write".into(),
            user: Some("bot".into()),
            issued_at: Timestamp::from_second(1_700_000_000).unwrap(),
            refresh_issued_at: None,
            expires_at: None,
            renewal_time: Timestamp::from_second(1_700_086_400).unwrap(),
            inputs: "abc".into(),
            verified_at: None,
            verify_failed_at: None,
            rejected_at: None,
            refresh_broken: true,
            clock_offset: Some(-2),
            application_id: Some(3),
        }
    }

    #[test]
    fn state_round_trips_and_debug_redacts() {
        let mut state = TokenState {
            current: Some(held()),
            retiring: vec![],
            issuing: Some(IssueIntent {
                tag: "awxto-1a2b3c4d".into(),
                started_at: Timestamp::from_second(1_700_000_000).unwrap(),
                personal: true,
                gateway: false,
                refresh: false,
                holder: "op/1".into(),
                search_attempts: 2,
                search_after: Some(Timestamp::from_second(1_700_000_060).unwrap()),
                tagged: true,
                username: Some("bot".into()),
                client_id: None,
                application: None,
                clock_offset: Some(1),
                searched: true,
                search_error: Some("AWX answered 500".into()),
                claimed_at: Some(Timestamp::from_second(1_700_000_061).unwrap()),
            }),
            interrupted: vec![],
            rotated_for: Some("r1".into()),
            failure: Some(FailureRecord {
                attempts: 3,
                at: Timestamp::from_second(1_700_000_100).unwrap(),
                since: Some(Timestamp::from_second(1_700_000_000).unwrap()),
                reason: "AwxServerError".into(),
                message: "m".into(),
                retryable: true,
                inputs: "abc".into(),
                rotation: Some("r1".into()),
            }),
            restart: Some(RestartOwed {
                since: Timestamp::from_second(1_700_000_200).unwrap(),
                retry_after: None,
                attempts: 1,
                error: Some("forbidden".into()),
                restarted: Some(Restarted {
                    at: Timestamp::from_second(1_700_000_210).unwrap(),
                    workloads: vec![WorkloadRef {
                        kind: WorkloadKind::StatefulSet,
                        name: "db".into(),
                    }],
                }),
                warned: true,
            }),
            rollout_timed_out: None,
            session: Some(Session {
                access_token: Sensitive::new("SessionAccess321"),
                refresh_token: Sensitive::new("SessionRefresh654"),
                refreshed_at: Timestamp::from_second(1_700_000_400).unwrap(),
                inputs: "abc".into(),
                user: Some("alice".into()),
                rejected: false,
                url: Some("https://awx.example.com".into()),
                client_id: Some("app".into()),
                client_secret: Some(Sensitive::new("SessionClient987")),
                gateway: false,
            }),
        };
        state
            .retiring
            .push(held().retire(Timestamp::from_second(1_700_000_300).unwrap()));
        let bytes = state.encode();
        assert_eq!(TokenState::decode(&bytes).unwrap(), state);
        let debug = format!("{state:?}");
        assert!(!debug.contains("AccessValue123") && !debug.contains("RefreshValue456"));
        assert!(!debug.contains("ClientSecret789"));
        assert!(!debug.contains("SessionAccess321") && !debug.contains("SessionRefresh654"));
        assert!(!debug.contains("SessionClient987"));
        assert_eq!(
            state.next_revocation(),
            Some(Timestamp::from_second(1_700_000_300).unwrap())
        );
    }

    /// A state written by an earlier release (no failure record, no marker holder) reads.
    #[test]
    fn a_state_of_an_earlier_release_reads() {
        let old = br#"{"current":{"url":"https://awx.example.com/","accessToken":"A","personal":false,"gateway":false,"scope":"write","issuedAt":"2026-01-01T00:00:00Z","renewalTime":"2026-01-02T00:00:00Z","inputs":"x"},"issuing":{"tag":"awxto-1","startedAt":"2026-01-01T00:00:00Z","personal":true,"gateway":false},"rotatedFor":"r"}"#;
        let state = TokenState::decode(old).unwrap();
        assert_eq!(state.issuing.unwrap().holder, "");
        assert!(state.failure.is_none() && state.interrupted.is_empty());
        assert!(!state.current.unwrap().refresh_broken);
    }

    /// A failure record of an earlier release has no start of the streak: its last failure
    /// stands in for it.
    #[test]
    fn a_failure_record_of_an_earlier_release_fails_since_its_last_failure() {
        let old = br#"{"failure":{"attempts":2,"at":"2026-01-01T00:10:00Z","reason":"AwxServerError","message":"m","retryable":true,"inputs":"x"}}"#;
        let failure = TokenState::decode(old).unwrap().failure.unwrap();
        assert_eq!(failure.since, None);
        assert_eq!(
            failure.failing_since(),
            "2026-01-01T00:10:00Z".parse::<Timestamp>().unwrap()
        );
        let with_start = FailureRecord {
            since: Some("2026-01-01T00:00:00Z".parse().unwrap()),
            ..failure
        };
        assert_eq!(
            with_start.failing_since(),
            "2026-01-01T00:00:00Z".parse::<Timestamp>().unwrap()
        );
    }

    #[test]
    fn garbage_state_is_an_error_not_a_panic() {
        assert!(TokenState::decode(b"{not json").is_err());
        assert_eq!(TokenState::decode(b"{}").unwrap(), TokenState::default());
    }
}
