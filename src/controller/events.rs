//! Kubernetes events (`events.k8s.io/v1`), published the way kube-runtime's `Recorder` does:
//! a repeat of the same event (same object, type, reason and action) within six minutes is
//! counted in the first one's `series` instead of creating another event. Unlike the
//! `Recorder`, which keeps a full copy of every event for those six minutes (about 4 KiB each,
//! 4.4 MiB of heap partway through issuing 1,000 tokens, the largest item in the operator's heap
//! profile at N = 1,000), this keeps only what a repeat needs: the event's name, its count and
//! when it was last seen.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as KubeEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

/// How long a repeat is counted in the first event, as kube-runtime's `Recorder` does.
const REPEAT_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// How often the events no longer repeatable are forgotten.
const FORGET_EVERY: SignedDuration = SignedDuration::from_secs(30);

/// One event as published: `regarding` the object it is about, `action` what the operator
/// was doing.
pub struct Publication<'a> {
    pub warning: bool,
    pub reason: &'a str,
    pub note: &'a str,
    pub action: &'a str,
    pub regarding: &'a ObjectReference,
}

struct Published {
    namespace: String,
    name: String,
    count: i32,
    last: Timestamp,
}

#[derive(Default)]
struct Recent {
    by_key: HashMap<u64, Published>,
    forgotten_at: Option<Timestamp>,
}

pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
}

impl EventPublisher {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or_else(|| controller.to_string()),
            recent: Mutex::default(),
        }
    }

    pub async fn publish(&self, event: &Publication<'_>) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = super::hash_of(&(
            event.warning,
            event.reason,
            event.action,
            &event.regarding.kind,
            &event.regarding.namespace,
            &event.regarding.name,
            &event.regarding.uid,
        ));
        let repeat = {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            if recent.forgotten_at.is_none_or(|t| t + FORGET_EVERY <= now) {
                recent.by_key.retain(|_, p| p.last + REPEAT_WINDOW > now);
                recent.forgotten_at = Some(now);
            }
            recent
                .by_key
                .get(&key)
                .filter(|p| p.last + REPEAT_WINDOW > now)
                .map(|p| (p.namespace.clone(), p.name.clone(), p.count + 1))
        };
        if let Some((namespace, name, count)) = repeat {
            let api: Api<KubeEvent> = Api::namespaced(self.client.clone(), &namespace);
            let series = json!({"series": {"count": count, "lastObservedTime": MicroTime(now)}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                .await
            {
                Ok(_) => {
                    self.remember(key, namespace, name, count, now);
                    return Ok(());
                }
                // Gone (deleted, or expired by the API server): published anew below.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let namespace = event
            .regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let name = format!(
            "{}.{:x}",
            event.regarding.name.as_deref().unwrap_or(&self.controller),
            now.as_nanosecond()
        );
        let body = KubeEvent {
            action: Some(event.action.to_string()),
            reason: Some(event.reason.to_string()),
            note: Some(event.note.chars().take(1000).collect()),
            event_time: Some(MicroTime(now)),
            regarding: Some(event.regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(if event.warning { "Warning" } else { "Normal" }.to_string()),
            metadata: ObjectMeta {
                namespace: Some(namespace.clone()),
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..KubeEvent::default()
        };
        Api::<KubeEvent>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &body)
            .await?;
        self.remember(key, namespace, name, 1, now);
        Ok(())
    }

    fn remember(&self, key: u64, namespace: String, name: String, count: i32, now: Timestamp) {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_key
            .insert(
                key,
                Published {
                    namespace,
                    name,
                    count,
                    last: now,
                },
            );
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_key
            .len()
    }
}

#[cfg(test)]
mod tests {
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{method, path},
    };

    use super::*;

    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/apps/events";

    fn regarding(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("awx-token-operator.io/v1alpha1".into()),
            kind: Some("AwxToken".into()),
            namespace: Some("apps".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("1".into()),
            ..ObjectReference::default()
        }
    }

    async fn publisher() -> (EventPublisher, MockServer) {
        let api = MockServer::start().await;
        let echo = |r: &wiremock::Request| {
            let mut body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            body["apiVersion"] = json!("events.k8s.io/v1");
            body["kind"] = json!("Event");
            body["metadata"]["name"] = json!("echo");
            ResponseTemplate::new(201).set_body_json(body)
        };
        Mock::given(method("POST"))
            .and(path(EVENTS))
            .respond_with(echo)
            .mount(&api)
            .await;
        let config = kube::Config::new(api.uri().parse().unwrap());
        let client = Client::try_from(config).unwrap();
        (
            EventPublisher::new(client, "awx-token-operator", Some("pod-1".into())),
            api,
        )
    }

    async fn requests(api: &MockServer) -> Vec<(String, String, serde_json::Value)> {
        api.received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| {
                (
                    r.method.to_string(),
                    r.url.path().to_string(),
                    serde_json::from_slice(&r.body).unwrap_or_default(),
                )
            })
            .collect()
    }

    fn warning<'a>(reason: &'a str, note: &'a str, on: &'a ObjectReference) -> Publication<'a> {
        Publication {
            warning: true,
            reason,
            note,
            action: "Reconcile",
            regarding: on,
        }
    }

    #[tokio::test]
    async fn a_repeat_counts_in_the_first_event_and_another_reason_or_object_is_new() {
        let (events, api) = publisher().await;
        Mock::given(method("PATCH"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": "patched"}, "eventTime": "2026-12-07T00:00:00.000000Z"
            })))
            .mount(&api)
            .await;
        let (a, b) = (regarding("a"), regarding("b"));
        events
            .publish(&warning("AwxUnreachable", "first", &a))
            .await
            .unwrap();
        events
            .publish(&warning("AwxUnreachable", "second", &a))
            .await
            .unwrap();
        events
            .publish(&warning("AwxUnreachable", "third", &a))
            .await
            .unwrap();
        events
            .publish(&warning("InvalidCredentials", "x", &a))
            .await
            .unwrap();
        events
            .publish(&warning("AwxUnreachable", "x", &b))
            .await
            .unwrap();

        let seen = requests(&api).await;
        let calls: Vec<_> = seen
            .iter()
            .map(|(m, p, _)| (m.as_str(), p.clone()))
            .collect();
        let first = seen[0].2["metadata"]["name"].as_str().unwrap().to_string();
        assert!(first.starts_with("a."), "{first}");
        assert_eq!(
            calls,
            [
                ("POST", EVENTS.to_string()),
                ("PATCH", format!("{EVENTS}/{first}")),
                ("PATCH", format!("{EVENTS}/{first}")),
                ("POST", EVENTS.to_string()),
                ("POST", EVENTS.to_string()),
            ]
        );
        let created = &seen[0].2;
        assert_eq!(created["type"], "Warning");
        assert_eq!(created["reason"], "AwxUnreachable");
        assert_eq!(created["note"], "first");
        assert_eq!(created["action"], "Reconcile");
        assert_eq!(created["reportingController"], "awx-token-operator");
        assert_eq!(created["reportingInstance"], "pod-1");
        assert_eq!(created["regarding"]["uid"], "uid-a");
        assert!(created["eventTime"].is_string());
        // A repeat sends only the series: the note stays the first one's.
        assert_eq!(
            seen[1].2.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["series"]
        );
        assert_eq!(seen[1].2["series"]["count"], 2);
        assert_eq!(seen[2].2["series"]["count"], 3);
        assert!(seen[2].2["series"]["lastObservedTime"].is_string());
        assert_eq!(seen[4].2["regarding"]["name"], "b");
        assert_eq!(events.remembered(), 3);
    }

    #[tokio::test]
    async fn a_repeat_of_an_event_that_is_gone_is_published_anew() {
        let (events, api) = publisher().await;
        Mock::given(method("PATCH"))
            .respond_with(ResponseTemplate::new(404).set_body_json(json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "events not found"
            })))
            .mount(&api)
            .await;
        let a = regarding("a");
        events
            .publish(&warning("AwxUnreachable", "first", &a))
            .await
            .unwrap();
        events
            .publish(&warning("AwxUnreachable", "again", &a))
            .await
            .unwrap();
        events
            .publish(&warning("AwxUnreachable", "and again", &a))
            .await
            .unwrap();

        let seen = requests(&api).await;
        let calls: Vec<_> = seen.iter().map(|(m, _, _)| m.as_str()).collect();
        assert_eq!(calls, ["POST", "PATCH", "POST", "PATCH", "POST"]);
        assert_eq!(seen[2].2["note"], "again");
        assert_eq!(seen[4].2["note"], "and again");
        // The one published anew is what a repeat patches next.
        assert_ne!(seen[1].1, seen[3].1);
        assert!(
            seen[3]
                .1
                .ends_with(seen[2].2["metadata"]["name"].as_str().unwrap())
        );
    }
}
