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
            // Gone since it was read: the driver re-reads, finds nothing and treats it as deleted.
            Err(e) if is_not_found(&e) => Ok(None),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::Method;
    use kube::runtime::events::Reporter;
    use serde_json::{Value, json};

    use super::*;
    use crate::api::task::{AtomicTaskSpec, Operation, TaskInput};
    use crate::dispatch::{Dispatcher, NoopExecutor};
    use crate::driver::DriverConfig;
    use crate::engine::state::DispatchState;
    use crate::fixtures::{Expect, mock_client, status_body};
    use crate::metrics::Metrics;

    const TASKS: &str = "/apis/atomic.dev/v1alpha1/namespaces/ns/atomictasks";
    const TASK_PATH: &str = "/apis/atomic.dev/v1alpha1/namespaces/ns/atomictasks/summarize";
    const STATUS_PATH: &str = "/apis/atomic.dev/v1alpha1/namespaces/ns/atomictasks/summarize/status";
    const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";
    const CM_PATH: &str = "/api/v1/namespaces/ns/configmaps/inputs";

    fn spec() -> AtomicTaskSpec {
        AtomicTaskSpec {
            model: Some("intent".to_owned()),
            operation: Operation::Generate,
            input: Some(TaskInput {
                text: Some("hello".to_owned()),
                value_from: None,
            }),
            ..AtomicTaskSpec::default()
        }
    }

    fn task_with(spec: AtomicTaskSpec, resource_version: &str) -> AtomicTask {
        let mut task = AtomicTask::new("summarize", spec);
        task.metadata.namespace = Some("ns".to_owned());
        task.metadata.uid = Some("uid-summarize".to_owned());
        task.metadata.generation = Some(1);
        task.metadata.resource_version = Some(resource_version.to_owned());
        task
    }

    fn task(resource_version: &str) -> AtomicTask {
        task_with(spec(), resource_version)
    }

    /// The API server's answer to a status write: the task at a new resourceVersion.
    fn written(task: &AtomicTask, resource_version: &str, phase: &str) -> Value {
        let mut answer = serde_json::to_value(task).unwrap();
        answer["metadata"]["resourceVersion"] = json!(resource_version);
        answer["status"] = json!({ "phase": phase });
        answer
    }

    fn event_answer() -> Value {
        json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "summarize.1", "namespace": "ns"}
        })
    }

    /// Expects the Event of a phase change of the task `summarize`.
    fn expect_event(reason: &'static str, type_: &'static str, action: &'static str) -> Expect {
        Expect::new(Method::POST, EVENTS_PATH, 201, event_answer()).checking(move |body| {
            assert_eq!(body["reason"], reason, "{body}");
            assert_eq!(body["type"], type_, "{body}");
            assert_eq!(body["action"], action, "{body}");
            assert_eq!(body["regarding"]["kind"], "AtomicTask");
            assert_eq!(body["regarding"]["name"], "summarize");
            assert_eq!(body["regarding"]["namespace"], "ns");
            assert_eq!(body["reportingController"], "atomic-operator");
        })
    }

    fn context(client: Client) -> Arc<TaskContext<NoopExecutor>> {
        let metrics = Arc::new(Metrics::new().unwrap());
        let dispatcher = Arc::new(Dispatcher::new(
            Arc::new(NoopExecutor),
            Arc::clone(&metrics),
            4,
            4,
        ));
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "atomic-operator".into(),
                instance: None,
            },
        );
        let (wake, _) = mpsc::unbounded_channel();
        let store = Arc::new(KubeStore::new(client, recorder, wake));
        let driver = Driver::new(store, dispatcher, Arc::clone(&metrics), DriverConfig::default());
        Arc::new(TaskContext { driver, metrics })
    }

    fn key() -> TaskKey {
        TaskKey {
            namespace: "ns".to_owned(),
            name: "summarize".to_owned(),
        }
    }

    fn dispatch_state(ctx: &TaskContext<NoopExecutor>) -> DispatchState {
        ctx.driver.dispatcher().state_of(&key())
    }

    #[tokio::test]
    async fn a_new_task_is_queued_with_the_resource_version_it_read() {
        let t = task("1");
        let (client, server) = mock_client(vec![
            Expect::new(Method::GET, TASK_PATH, 200, serde_json::to_value(&t).unwrap()),
            Expect::new(Method::PUT, STATUS_PATH, 200, written(&t, "2", "Queued")).checking(|body| {
                assert_eq!(body["metadata"]["resourceVersion"], "1");
                assert_eq!(body["status"]["phase"], "Queued");
                assert_eq!(body["status"]["reason"], "Queued");
                assert_eq!(body["status"]["observedGeneration"], 1);
            }),
            expect_event("Queued", "Normal", "PendingToQueued"),
        ]);
        let ctx = context(client);
        let action = reconcile(Arc::new(t), Arc::clone(&ctx)).await.unwrap();
        assert_eq!(action, Action::await_change());
        assert_eq!(dispatch_state(&ctx), DispatchState::Queued);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_conflict_on_the_status_write_rereads_and_writes_again() {
        let t = task("1");
        let (client, server) = mock_client(vec![
            Expect::new(Method::GET, TASK_PATH, 200, serde_json::to_value(&t).unwrap()),
            Expect::new(Method::PUT, STATUS_PATH, 409, status_body(409, "Conflict"))
                .checking(|body| assert_eq!(body["metadata"]["resourceVersion"], "1")),
            Expect::new(
                Method::GET,
                TASK_PATH,
                200,
                serde_json::to_value(task("2")).unwrap(),
            ),
            Expect::new(Method::PUT, STATUS_PATH, 200, written(&t, "3", "Queued")).checking(|body| {
                assert_eq!(body["metadata"]["resourceVersion"], "2");
                assert_eq!(body["status"]["phase"], "Queued");
            }),
            expect_event("Queued", "Normal", "PendingToQueued"),
        ]);
        let ctx = context(client);
        reconcile(Arc::new(t), Arc::clone(&ctx)).await.unwrap();
        assert_eq!(dispatch_state(&ctx), DispatchState::Queued);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_task_that_is_gone_is_not_written() {
        let (client, server) = mock_client(vec![Expect::new(
            Method::GET,
            TASK_PATH,
            404,
            status_body(404, "NotFound"),
        )]);
        let ctx = context(client);
        let action = reconcile(Arc::new(task("1")), Arc::clone(&ctx)).await.unwrap();
        assert_eq!(action, Action::await_change());
        assert_eq!(dispatch_state(&ctx), DispatchState::Idle);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_task_deleted_between_read_and_write_is_treated_as_gone() {
        let t = task("1");
        let (client, server) = mock_client(vec![
            Expect::new(Method::GET, TASK_PATH, 200, serde_json::to_value(&t).unwrap()),
            Expect::new(Method::PUT, STATUS_PATH, 404, status_body(404, "NotFound")),
            Expect::new(Method::GET, TASK_PATH, 404, status_body(404, "NotFound")),
        ]);
        let ctx = context(client);
        let action = reconcile(Arc::new(t), Arc::clone(&ctx)).await.unwrap();
        assert_eq!(action, Action::await_change());
        assert_eq!(dispatch_state(&ctx), DispatchState::Idle);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_dependency_blocks_the_task() {
        let t = task_with(
            AtomicTaskSpec {
                depends_on: vec!["extract".to_owned()],
                ..spec()
            },
            "1",
        );
        let dep = format!("{TASKS}/extract");
        let (client, server) = mock_client(vec![
            Expect::new(Method::GET, TASK_PATH, 200, serde_json::to_value(&t).unwrap()),
            // Read once: the cycle check reuses what the dependency state read.
            Expect::new(Method::GET, &dep, 404, status_body(404, "NotFound")),
            Expect::new(Method::PUT, STATUS_PATH, 200, written(&t, "2", "Blocked")).checking(|body| {
                assert_eq!(body["metadata"]["resourceVersion"], "1");
                assert_eq!(body["status"]["phase"], "Blocked");
                assert_eq!(body["status"]["reason"], "WaitingForDependencies");
                let message = body["status"]["message"].as_str().unwrap_or_default();
                assert!(message.contains("extract (not found)"), "{message}");
            }),
            expect_event("WaitingForDependencies", "Normal", "PendingToBlocked"),
        ]);
        let ctx = context(client);
        reconcile(Arc::new(t), Arc::clone(&ctx)).await.unwrap();
        assert_eq!(dispatch_state(&ctx), DispatchState::Idle);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_api_error_on_the_status_write_is_an_error_not_a_panic() {
        for (code, reason) in [(500, "InternalError"), (504, "Timeout")] {
            let t = task("1");
            let (client, server) = mock_client(vec![
                Expect::new(Method::GET, TASK_PATH, 200, serde_json::to_value(&t).unwrap()),
                Expect::new(Method::PUT, STATUS_PATH, code, status_body(code, reason)),
            ]);
            let ctx = context(client);
            let err = reconcile(Arc::new(t), Arc::clone(&ctx)).await.unwrap_err();
            assert_eq!(err.metric_label(), "api", "{code}: {err}");
            let action = crate::controller::error_policy("atomictask", &err, &ctx.metrics);
            assert_eq!(action, Action::requeue(std::time::Duration::from_secs(5)));
            // Nothing was queued for a status that was never written.
            assert_eq!(dispatch_state(&ctx), DispatchState::Idle);
            server.await.unwrap();
        }
    }

    fn config_map_input() -> AtomicTask {
        task_with(
            AtomicTaskSpec {
                input: Some(TaskInput {
                    text: None,
                    value_from: Some(InputSource {
                        config_map_key_ref: Some(KeyRef {
                            name: "inputs".to_owned(),
                            key: "text".to_owned(),
                        }),
                        secret_key_ref: None,
                    }),
                }),
                ..spec()
            },
            "1",
        )
    }

    fn config_map(data: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "inputs", "namespace": "ns"},
            "data": data
        })
    }

    #[tokio::test]
    async fn input_from_a_config_map_is_read_and_the_task_queued() {
        let t = config_map_input();
        let (client, server) = mock_client(vec![
            Expect::new(Method::GET, TASK_PATH, 200, serde_json::to_value(&t).unwrap()),
            Expect::new(
                Method::GET,
                CM_PATH,
                200,
                config_map(json!({"text": "from a config map"})),
            ),
            Expect::new(Method::PUT, STATUS_PATH, 200, written(&t, "2", "Queued"))
                .checking(|body| assert_eq!(body["status"]["phase"], "Queued")),
            expect_event("Queued", "Normal", "PendingToQueued"),
        ]);
        let ctx = context(client);
        reconcile(Arc::new(t), Arc::clone(&ctx)).await.unwrap();
        assert_eq!(dispatch_state(&ctx), DispatchState::Queued);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_config_map_without_the_key_fails_the_task() {
        let t = config_map_input();
        let (client, server) = mock_client(vec![
            Expect::new(Method::GET, TASK_PATH, 200, serde_json::to_value(&t).unwrap()),
            Expect::new(Method::GET, CM_PATH, 200, config_map(json!({"other": "x"}))),
            Expect::new(Method::PUT, STATUS_PATH, 200, written(&t, "2", "Failed")).checking(|body| {
                assert_eq!(body["status"]["phase"], "Failed");
                assert_eq!(body["status"]["reason"], "InputUnavailable");
                let message = body["status"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("ConfigMap ns/inputs") && message.contains("no key text"),
                    "{message}"
                );
            }),
            expect_event("InputUnavailable", "Warning", "PendingToFailed"),
        ]);
        let ctx = context(client);
        reconcile(Arc::new(t), Arc::clone(&ctx)).await.unwrap();
        assert_eq!(dispatch_state(&ctx), DispatchState::Idle);
        server.await.unwrap();
    }
}
