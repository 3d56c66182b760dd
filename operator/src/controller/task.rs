//! AtomicTask controller: a [`TaskStore`] over the Kubernetes API and the reconcile that feeds
//! observations to the task driver.
//!
//! Status writes carry the object's `resourceVersion`, so a concurrent writer makes the write
//! fail with 409 and the driver re-reads and decides again: no update is lost or applied twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use serde_json::Value;
use tokio::sync::mpsc;

use super::FIELD_MANAGER;
use crate::api::task::{AtomicTask, AtomicTaskStatus, InputSource, KeyRef, TaskPhase};
use crate::dispatch::{Executor, TaskKey};
use crate::driver::{Driver, TaskStore};
use crate::engine::state::{Event, Transition};
use crate::{Error, Result};

/// Key under which a large result is stored in its ConfigMap.
pub const RESULT_KEY: &str = "result.json";

/// Tasks and their referenced objects, read and written through the API server.
pub struct KubeStore {
    client: Client,
    recorder: Recorder,
    wake: mpsc::UnboundedSender<ObjectRef<AtomicTask>>,
}

impl KubeStore {
    /// A store whose wake-ups go to `wake` (the controller's `reconcile_on` stream).
    pub fn new(
        client: Client,
        recorder: Recorder,
        wake: mpsc::UnboundedSender<ObjectRef<AtomicTask>>,
    ) -> Self {
        KubeStore {
            client,
            recorder,
            wake,
        }
    }

    fn tasks(&self, namespace: &str) -> Api<AtomicTask> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn result_config_map(task: &AtomicTask, name: String, data: BTreeMap<String, String>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: task.namespace(),
            labels: Some(BTreeMap::from([("atomic.dev/task".to_owned(), task.name_any())])),
            // Owned by the task, so it goes when the task goes.
            owner_references: task.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}

impl TaskStore for KubeStore {
    async fn get(&self, key: &TaskKey) -> Result<Option<AtomicTask>> {
        Ok(self.tasks(&key.namespace).get_opt(&key.name).await?)
    }

    async fn write_status(&self, task: &AtomicTask, status: &AtomicTaskStatus) -> Result<Option<AtomicTask>> {
        let namespace = task.namespace().unwrap_or_default();
        let mut updated = task.clone();
        updated.status = Some(status.clone());
        // replace_status sends the resourceVersion we read: a stale one answers 409.
        match self
            .tasks(&namespace)
            .replace_status(&task.name_any(), &PostParams::default(), &updated)
            .await
        {
            Ok(written) => Ok(Some(written)),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) if is_not_found(&e) => {
                Err(Error::NotFound(format!("task {namespace}/{}", task.name_any())))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn delete(&self, key: &TaskKey) -> Result<()> {
        match self
            .tasks(&key.namespace)
            .delete(&key.name, &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn read_value(&self, namespace: &str, source: &InputSource) -> std::result::Result<String, String> {
        if let Some(at) = &source.config_map_key_ref {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
            let cm = api
                .get_opt(&at.name)
                .await
                .map_err(|e| format!("reading ConfigMap {namespace}/{}: {e}", at.name))?
                .ok_or_else(|| format!("ConfigMap {namespace}/{} not found", at.name))?;
            return cm
                .data
                .and_then(|mut d| d.remove(&at.key))
                .ok_or_else(|| format!("ConfigMap {namespace}/{} has no key {}", at.name, at.key));
        }
        if let Some(at) = &source.secret_key_ref {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
            let secret = api
                .get_opt(&at.name)
                .await
                .map_err(|e| format!("reading Secret {namespace}/{}: {e}", at.name))?
                .ok_or_else(|| format!("Secret {namespace}/{} not found", at.name))?;
            let bytes = secret
                .data
                .and_then(|mut d| d.remove(&at.key))
                .ok_or_else(|| format!("Secret {namespace}/{} has no key {}", at.name, at.key))?;
            return String::from_utf8(bytes.0)
                .map_err(|_| format!("Secret {namespace}/{} key {} is not UTF-8", at.name, at.key));
        }
        Err("valueFrom names no ConfigMap or Secret".to_owned())
    }

    async fn store_result(&self, task: &AtomicTask, result: &Value) -> Result<KeyRef> {
        let at = KeyRef {
            name: format!("{}-result", task.name_any()),
            key: RESULT_KEY.to_owned(),
        };
        let cm = result_config_map(
            task,
            at.name.clone(),
            BTreeMap::from([(at.key.clone(), serde_json::to_string(result)?)]),
        );
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &task.namespace().unwrap_or_default());
        api.patch(
            &at.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await?;
        Ok(at)
    }

    async fn load_result(&self, namespace: &str, at: &KeyRef) -> std::result::Result<Value, String> {
        let source = InputSource {
            config_map_key_ref: Some(at.clone()),
            secret_key_ref: None,
        };
        let text = self.read_value(namespace, &source).await?;
        serde_json::from_str(&text)
            .map_err(|e| format!("ConfigMap {namespace}/{} holds no JSON result: {e}", at.name))
    }

    async fn write_output(&self, task: &AtomicTask, config_map: &str, result: &Value) -> Result<()> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &task.namespace().unwrap_or_default());
        let value = match result {
            Value::String(s) => s.clone(),
            other => serde_json::to_string(other)?,
        };
        // One field manager per task: tasks sharing an output ConfigMap own only their own key.
        let manager = format!("{FIELD_MANAGER}/{}", task.name_any());
        let patch = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": config_map },
            "data": { task.name_any(): value },
        });
        api.patch(
            config_map,
            &PatchParams::apply(&manager).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }

    async fn record(&self, task: &AtomicTask, transition: &Transition) {
        let warning = matches!(transition.to, TaskPhase::Failed | TaskPhase::TimedOut);
        let event = KubeEvent {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: transition.reason.to_owned(),
            note: Some(truncate(&transition.message, 1024)),
            action: format!("{}To{}", transition.from.as_str(), transition.to.as_str()),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &task.object_ref(&())).await {
            tracing::debug!(task = %task.name_any(), error = %e, "could not publish an event");
        }
    }

    fn wake(&self, key: TaskKey) {
        let _ = self.wake.send(ObjectRef::new(&key.name).within(&key.namespace));
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Context of the AtomicTask controller.
pub struct TaskContext<E> {
    /// The driver over the Kubernetes store.
    pub driver: Arc<Driver<KubeStore, E>>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Reconciles one AtomicTask: an observation through the driver, requeued when the engine
/// says something becomes due.
pub async fn reconcile<E: Executor>(task: Arc<AtomicTask>, ctx: Arc<TaskContext<E>>) -> Result<Action> {
    let key = TaskKey {
        namespace: task
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?,
        name: task.name_any(),
    };
    let applied = ctx.driver.apply(&key, Event::Observe).await?;
    Ok(applied
        .requeue_after
        .map_or_else(Action::await_change, Action::requeue))
}
