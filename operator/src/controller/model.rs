//! ModelDeployment controller: applies the worker Deployment and Service (server-side apply,
//! one field manager), scales replicas between `min` and `max` from the dispatcher's queue, and
//! reports readiness and revision in the status. A finalizer forgets the model's dispatch lane
//! on deletion; the children go with their owner through garbage collection.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{Context, FIELD_MANAGER};
use crate::api::model::{ModelDeployment, ModelDeploymentStatus, ModelPhase};
use crate::dispatch::{Executor, Lane};
use crate::engine::queue::desired_replicas;
use crate::workload::{REVISION_ANNOTATION, selector_string, worker_deployment, worker_service};
use crate::{Error, Result};

/// Finalizer that lets the operator forget the model's queue before the object goes.
pub const FINALIZER: &str = "atomic.dev/model-cleanup";

/// Re-check interval while tasks wait or replicas are changing.
const BUSY_REQUEUE: Duration = Duration::from_secs(10);
/// Re-check interval when nothing is happening (catches drift).
const IDLE_REQUEUE: Duration = Duration::from_secs(300);

/// The lane of a ModelDeployment's tasks.
pub fn lane(md: &ModelDeployment) -> Lane {
    Lane {
        namespace: md.namespace().unwrap_or_default(),
        model: Some(md.name_any()),
    }
}

/// Reconciles one ModelDeployment.
pub async fn reconcile<E: Executor>(md: Arc<ModelDeployment>, ctx: Arc<Context<E>>) -> Result<Action> {
    let namespace = md.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, md, |event| async {
        match event {
            FinalizerEvent::Apply(md) => apply(&md, &ctx).await,
            FinalizerEvent::Cleanup(md) => {
                ctx.dispatcher.forget_lane(&lane(&md));
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply<E: Executor>(md: &ModelDeployment, ctx: &Context<E>) -> Result<Action> {
    let namespace = md.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let models: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = crate::workload::worker_name(md);
    let now = Timestamp::now();

    let lane = lane(md);
    ctx.dispatcher
        .set_endpoint_limit(&lane, md.spec.replicas.max_in_flight_per_replica);
    let load = ctx.dispatcher.load(&lane);
    let existing = deployments.get_opt(&name).await?;
    let current = existing.as_ref().and_then(|d| d.spec.replicas).unwrap_or(0);
    let old_status = md.status.clone().unwrap_or_default();
    let last_scale = old_status.last_scale_time.as_ref().map(|t| t.0);
    let desired = desired_replicas(
        &md.spec.replicas,
        load.queued,
        load.in_flight,
        current,
        last_scale,
        now,
    );

    let params = PatchParams::apply(FIELD_MANAGER).force();
    let deployment = worker_deployment(md, &ctx.worker_defaults, desired);
    let applied = deployments
        .patch(&name, &params, &Patch::Apply(&deployment))
        .await?;
    services
        .patch(&name, &params, &Patch::Apply(&worker_service(md)))
        .await?;

    let status = status_from(
        md,
        &applied,
        desired,
        current,
        load.queued,
        load.in_flight,
        &old_status,
        now,
    );
    let busy = load.queued + load.in_flight > 0 || status.ready_replicas != desired;
    let patch = json!({
        "apiVersion": ModelDeployment::api_version(&()),
        "kind": ModelDeployment::kind(&()),
        "status": status,
    });
    models
        .patch_status(&md.name_any(), &params, &Patch::Apply(&patch))
        .await?;
    Ok(Action::requeue(if busy { BUSY_REQUEUE } else { IDLE_REQUEUE }))
}

/// The status from the applied Deployment and the dispatcher's load.
#[allow(clippy::too_many_arguments)]
fn status_from(
    md: &ModelDeployment,
    deployment: &Deployment,
    desired: i32,
    previous_replicas: i32,
    queued: u32,
    in_flight: u32,
    old: &ModelDeploymentStatus,
    now: Timestamp,
) -> ModelDeploymentStatus {
    let dstatus = deployment.status.clone().unwrap_or_default();
    let ready = dstatus.ready_replicas.unwrap_or(0);
    let revision = deployment
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION_ANNOTATION))
        .cloned();
    let updated = dstatus.updated_replicas.unwrap_or(0);
    let rolled_out = updated >= desired && dstatus.replicas.unwrap_or(0) == desired;
    let phase = if desired == 0 {
        ModelPhase::ScaledToZero
    } else if ready > 0 && rolled_out {
        ModelPhase::Ready
    } else {
        ModelPhase::Progressing
    };
    let generation = md.metadata.generation;
    let available = condition(
        old,
        "Available",
        ready > 0 || desired == 0,
        if ready > 0 {
            "ReplicasReady"
        } else if desired == 0 {
            "ScaledToZero"
        } else {
            "NoReadyReplica"
        },
        &format!("{ready} of {desired} replicas ready"),
        generation,
        now,
    );
    let progressing = condition(
        old,
        "Progressing",
        !rolled_out || ready < desired,
        if rolled_out && ready >= desired {
            "RolledOut"
        } else {
            "RollingOut"
        },
        &format!(
            "revision {}: {updated} updated, {ready} ready, {desired} desired",
            revision.as_deref().unwrap_or("-")
        ),
        generation,
        now,
    );
    ModelDeploymentStatus {
        phase,
        replicas: dstatus.replicas.unwrap_or(0),
        ready_replicas: ready,
        desired_replicas: desired,
        queue_depth: queued,
        in_flight,
        revision,
        selector: Some(selector_string(md)),
        last_scale_time: if desired != previous_replicas {
            Some(Time(now))
        } else {
            old.last_scale_time.clone()
        },
        observed_generation: generation,
        conditions: vec![available, progressing],
    }
}

/// A condition that keeps its transition time while its status does not change.
fn condition(
    old: &ModelDeploymentStatus,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let since = old
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: since,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::Method;
    use serde_json::{Value, json};

    use super::*;
    use crate::api::model::{HostPathSource, ModelDeploymentSpec, ModelSource, ModelSpec, ReplicaPolicy};
    use crate::dispatch::{Dispatcher, Job, NoopExecutor, TaskKey, Work};
    use crate::fixtures::{Expect, mock_client, status_body};
    use crate::metrics::Metrics;
    use crate::worker_client::ModelRequest;

    const MD_PATH: &str = "/apis/atomic.dev/v1alpha1/namespaces/ns/modeldeployments/intent";
    const DEPLOY_PATH: &str = "/apis/apps/v1/namespaces/ns/deployments/intent-worker";
    const SVC_PATH: &str = "/api/v1/namespaces/ns/services/intent-worker";

    fn model(finalizer: bool, min: i32, max: i32) -> ModelDeployment {
        let mut md = ModelDeployment::new(
            "intent",
            ModelDeploymentSpec {
                model: ModelSpec {
                    source: ModelSource {
                        persistent_volume_claim: None,
                        host_path: Some(HostPathSource {
                            path: "/models/minilm".to_owned(),
                        }),
                    },
                    ..ModelSpec::default()
                },
                replicas: ReplicaPolicy {
                    min,
                    max,
                    ..ReplicaPolicy::default()
                },
                ..ModelDeploymentSpec::default()
            },
        );
        md.metadata.namespace = Some("ns".to_owned());
        md.metadata.uid = Some("uid-md".to_owned());
        md.metadata.generation = Some(2);
        if finalizer {
            md.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
        }
        md
    }

    fn context(client: kube::Client) -> Arc<Context<NoopExecutor>> {
        let metrics = Arc::new(Metrics::new().unwrap());
        Arc::new(Context {
            client,
            worker_defaults: crate::workload::WorkerDefaults {
                image: "atomic-worker:test".to_owned(),
                image_pull_policy: "IfNotPresent".to_owned(),
            },
            dispatcher: Arc::new(Dispatcher::new(
                Arc::new(NoopExecutor),
                Arc::clone(&metrics),
                4,
                4,
            )),
            metrics,
        })
    }

    fn deployment_answer(replicas: i32, ready: i32) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "intent-worker", "namespace": "ns", "annotations": {"atomic.dev/revision": "abc"}},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
            "status": {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas}
        })
    }

    fn queue_tasks(ctx: &Context<NoopExecutor>, n: usize) {
        for i in 0..n {
            ctx.dispatcher.enqueue(
                lane(&model(true, 0, 3)),
                Job {
                    key: TaskKey {
                        namespace: "ns".to_owned(),
                        name: format!("t{i}"),
                    },
                    idempotency_key: format!("t{i}"),
                    attempt: 1,
                    priority: 0,
                    not_before: None,
                    timeout: Duration::from_secs(5),
                    work: Work::Model(ModelRequest {
                        model: "intent".to_owned(),
                        operation: crate::api::Operation::Classify,
                        prompt: "x".to_owned(),
                        labels: vec![],
                        parameters: None,
                    }),
                },
            );
        }
    }

    #[tokio::test]
    async fn a_new_model_gets_the_finalizer_before_anything_else() {
        let md = model(false, 1, 1);
        let answer = serde_json::to_value(model(true, 1, 1)).unwrap();
        let (client, server) = mock_client(vec![Expect::new(Method::PATCH, MD_PATH, 200, answer).checking(
            |body| {
                assert_eq!(body[1]["op"], "add");
                assert_eq!(body[1]["value"][0], FINALIZER);
            },
        )]);
        let action = reconcile(Arc::new(md), context(client)).await.unwrap();
        assert_eq!(action, Action::await_change());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_scale_to_zero_model_applies_zero_replicas_service_and_status() {
        let (client, server) = mock_client(vec![
            Expect::new(Method::GET, DEPLOY_PATH, 404, status_body(404, "NotFound")),
            Expect::new(Method::PATCH, DEPLOY_PATH, 200, deployment_answer(0, 0)).checking(|body| {
                assert_eq!(body["spec"]["replicas"], 0);
                assert_eq!(body["metadata"]["ownerReferences"][0]["kind"], "ModelDeployment");
                assert_eq!(body["spec"]["template"]["spec"]["automountServiceAccountToken"], false);
            }),
            Expect::new(Method::PATCH, SVC_PATH, 200, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "intent-worker"}})),
            Expect::new(Method::PATCH, format!("{MD_PATH}/status"), 200, serde_json::to_value(model(true, 0, 3)).unwrap())
                .checking(|body| {
                    assert_eq!(body["status"]["phase"], "ScaledToZero");
                    assert_eq!(body["status"]["desiredReplicas"], 0);
                    assert_eq!(body["status"]["revision"], "abc");
                    assert_eq!(body["status"]["observedGeneration"], 2);
                    assert_eq!(body["status"]["selector"], "app.kubernetes.io/instance=intent,app.kubernetes.io/name=atomic-worker,atomic.dev/model=intent");
                }),
        ]);
        let action = reconcile(Arc::new(model(true, 0, 3)), context(client))
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(IDLE_REQUEUE));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn waiting_tasks_scale_a_model_up_from_zero() {
        let (client, server) = mock_client(vec![
            Expect::new(Method::GET, DEPLOY_PATH, 200, deployment_answer(0, 0)),
            Expect::new(Method::PATCH, DEPLOY_PATH, 200, deployment_answer(2, 0))
                .checking(|body| assert_eq!(body["spec"]["replicas"], 2, "40 tasks / 32 per replica")),
            Expect::new(
                Method::PATCH,
                SVC_PATH,
                200,
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "intent-worker"}}),
            ),
            Expect::new(
                Method::PATCH,
                format!("{MD_PATH}/status"),
                200,
                serde_json::to_value(model(true, 0, 3)).unwrap(),
            )
            .checking(|body| {
                assert_eq!(body["status"]["queueDepth"], 40);
                assert_eq!(body["status"]["phase"], "Progressing");
                assert!(body["status"]["lastScaleTime"].is_string());
            }),
        ]);
        let ctx = context(client);
        queue_tasks(&ctx, 40);
        let action = reconcile(Arc::new(model(true, 0, 3)), ctx).await.unwrap();
        assert_eq!(action, Action::requeue(BUSY_REQUEUE));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_conflict_on_apply_fails_the_reconcile_and_requeues_fast() {
        let (client, server) = mock_client(vec![
            Expect::new(Method::GET, DEPLOY_PATH, 200, deployment_answer(1, 1)),
            Expect::new(Method::PATCH, DEPLOY_PATH, 409, status_body(409, "Conflict")),
        ]);
        let ctx = context(client);
        let err = reconcile(Arc::new(model(true, 1, 1)), Arc::clone(&ctx))
            .await
            .unwrap_err();
        assert_eq!(err.metric_label(), "finalizer");
        assert!(err.to_string().contains("apply"), "{err}");
        let action = crate::controller::error_policy("modeldeployment", &err, &ctx.metrics);
        assert_eq!(action, Action::requeue(Duration::from_secs(5)));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_api_timeout_is_an_error_not_a_panic() {
        let (client, server) = mock_client(vec![Expect::new(
            Method::GET,
            DEPLOY_PATH,
            504,
            status_body(504, "Timeout"),
        )]);
        assert!(
            reconcile(Arc::new(model(true, 1, 1)), context(client))
                .await
                .is_err()
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn deletion_forgets_the_queue_and_removes_the_finalizer() {
        let mut md = model(true, 0, 3);
        md.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let (client, server) = mock_client(vec![
            Expect::new(
                Method::PATCH,
                MD_PATH,
                200,
                serde_json::to_value(model(false, 0, 3)).unwrap(),
            )
            .checking(|body| {
                assert_eq!(body[0]["op"], "test");
                assert_eq!(body[1]["op"], "remove");
            }),
        ]);
        let ctx = context(client);
        queue_tasks(&ctx, 3);
        assert_eq!(ctx.dispatcher.load(&lane(&md)).queued, 3);
        reconcile(Arc::new(md.clone()), Arc::clone(&ctx)).await.unwrap();
        assert_eq!(ctx.dispatcher.load(&lane(&md)).queued, 0);
        server.await.unwrap();
    }
}
