//! Pure builders for what a ModelDeployment owns: the worker Deployment and its Service.
//!
//! Everything here is a function of the ModelDeployment and the operator's defaults, so the
//! objects are tested without a cluster and applied with server-side apply by the controller.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction, HostPathVolumeSource,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::api::model::{ModelDeployment, WORKER_PORT};

/// Label that names the ModelDeployment a worker pod or Service belongs to.
pub const MODEL_LABEL: &str = "atomic.dev/model";
/// Annotation carrying the pod template revision.
pub const REVISION_ANNOTATION: &str = "atomic.dev/revision";
/// Where the model folder is mounted in the worker container.
const MODEL_MOUNT: &str = "/models";
/// Non-root user the worker runs as (the distroless "nonroot" user).
const WORKER_UID: i64 = 65532;
/// Where GPU workers keep their compiled kernels: inside the writable /tmp volume.
const KERNEL_CACHE_DIR: &str = "/tmp/atomic-worker-kernels";

/// Operator-wide defaults for worker pods.
#[derive(Clone, Debug)]
pub struct WorkerDefaults {
    /// Image used when the ModelDeployment names none.
    pub image: String,
    /// Image pull policy for worker containers.
    pub image_pull_policy: String,
}

/// Labels on every object that belongs to the ModelDeployment; also the pod selector.
pub fn selector_labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "atomic-worker".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), md.name_any()),
        (MODEL_LABEL.to_owned(), md.name_any()),
    ])
}

/// The label selector string of the worker pods (`status.selector`, for the scale subresource).
pub fn selector_string(md: &ModelDeployment) -> String {
    selector_labels(md)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Name of the worker Deployment and Service of a ModelDeployment.
pub fn worker_name(md: &ModelDeployment) -> String {
    format!("{}-worker", md.name_any())
}

fn owner_reference(md: &ModelDeployment) -> Option<OwnerReference> {
    md.controller_owner_ref(&())
}

fn metadata(md: &ModelDeployment) -> ObjectMeta {
    let mut labels = selector_labels(md);
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        "atomic-operator".to_owned(),
    );
    labels.insert("app.kubernetes.io/component".to_owned(), "worker".to_owned());
    ObjectMeta {
        name: Some(worker_name(md)),
        namespace: md.namespace(),
        labels: Some(labels),
        owner_references: owner_reference(md).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The worker pod template. Its hash is the revision.
pub fn pod_template(md: &ModelDeployment, defaults: &WorkerDefaults) -> PodTemplateSpec {
    let spec = &md.spec;
    let (volume, model_dir) = model_volume(md);
    let mut args = vec![
        "serve".to_owned(),
        "--model-dir".to_owned(),
        model_dir,
        "--model-name".to_owned(),
        md.name_any(),
        "--port".to_owned(),
        WORKER_PORT.to_string(),
    ];
    if let Some(task) = spec.model.task {
        args.extend(["--task".to_owned(), task.as_str().to_owned()]);
    }
    if !spec.model.labels.is_empty() {
        args.extend(["--labels".to_owned(), spec.model.labels.join(",")]);
    }
    if let Some(runtime) = &spec.runtime {
        if let Some(precision) = runtime.precision {
            args.extend(["--precision".to_owned(), precision.as_str().to_owned()]);
        }
        if let Some(tokens) = runtime.max_batch_tokens {
            args.extend(["--max-batch-tokens".to_owned(), tokens.to_string()]);
        }
        if let Some(concurrent) = runtime.max_concurrent_requests {
            args.extend(["--max-concurrent-requests".to_owned(), concurrent.to_string()]);
        }
        if let Some(batch) = runtime.cuda_graph_max_batch {
            args.extend(["--cuda-graph-max-batch".to_owned(), batch.to_string()]);
        }
    }
    let gpus = spec.resources.as_ref().map_or(0, |r| r.gpu);
    if gpus > 0 {
        args.extend(["--device".to_owned(), "cuda:0".to_owned()]);
        // The root filesystem is read-only; /tmp is the pod's emptyDir, which outlives a
        // container restart, so a restarted worker loads its compiled kernels instead of
        // compiling them again.
        args.extend(["--kernel-cache-dir".to_owned(), KERNEL_CACHE_DIR.to_owned()]);
    }

    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };

    let container = Container {
        name: "worker".to_owned(),
        image: Some(spec.image.clone().unwrap_or_else(|| defaults.image.clone())),
        image_pull_policy: Some(defaults.image_pull_policy.clone()),
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: WORKER_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        // Model loading can take minutes; the startup probe covers it so liveness stays strict.
        startup_probe: Some(probe("/health", 5, 120)),
        liveness_probe: Some(probe("/health", 10, 3)),
        readiness_probe: Some(probe("/ready", 5, 2)),
        resources: Some(resources(md)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "model".to_owned(),
                mount_path: MODEL_MOUNT.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };

    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(selector_labels(md)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            // Workers never talk to the API server.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(WORKER_UID),
                run_as_group: Some(WORKER_UID),
                fs_group: Some(WORKER_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            tolerations: (gpus > 0).then(|| {
                vec![Toleration {
                    key: Some("nvidia.com/gpu".to_owned()),
                    operator: Some("Exists".to_owned()),
                    effect: Some("NoSchedule".to_owned()),
                    ..Toleration::default()
                }]
            }),
            volumes: Some(vec![
                volume,
                Volume {
                    name: "tmp".to_owned(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                },
            ]),
            termination_grace_period_seconds: Some(60),
            ..PodSpec::default()
        }),
    }
}

/// The model volume and the model folder path inside the container.
fn model_volume(md: &ModelDeployment) -> (Volume, String) {
    let source = &md.spec.model.source;
    let mut volume = Volume {
        name: "model".to_owned(),
        ..Volume::default()
    };
    let mut dir = MODEL_MOUNT.to_owned();
    if let Some(pvc) = &source.persistent_volume_claim {
        volume.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: pvc.claim_name.clone(),
            read_only: Some(true),
        });
        if !pvc.path.is_empty() {
            dir = format!("{MODEL_MOUNT}/{}", pvc.path.trim_end_matches('/'));
        }
    } else if let Some(host) = &source.host_path {
        volume.host_path = Some(HostPathVolumeSource {
            path: host.path.clone(),
            type_: Some("Directory".to_owned()),
        });
    }
    (volume, dir)
}

fn resources(md: &ModelDeployment) -> ResourceRequirements {
    let mut amounts = BTreeMap::new();
    if let Some(r) = &md.spec.resources {
        if let Some(cpu) = &r.cpu {
            amounts.insert("cpu".to_owned(), Quantity(cpu.clone()));
        }
        if let Some(memory) = &r.memory {
            amounts.insert("memory".to_owned(), Quantity(memory.clone()));
        }
        if r.gpu > 0 {
            amounts.insert("nvidia.com/gpu".to_owned(), Quantity(r.gpu.to_string()));
        }
    }
    // Requests equal limits: a worker is sized for its model and should not be overcommitted.
    ResourceRequirements {
        requests: (!amounts.is_empty()).then(|| amounts.clone()),
        limits: (!amounts.is_empty()).then_some(amounts),
        ..ResourceRequirements::default()
    }
}

/// Revision of a pod template: a stable hash, so a changed template shows as a new revision.
pub fn revision(template: &PodTemplateSpec) -> String {
    // FNV-1a over the canonical JSON; serde_json writes struct fields in declaration order.
    let bytes = serde_json::to_vec(template).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:010x}", hash & 0xff_ffff_ffff)
}

/// The worker Deployment with `replicas` pods.
pub fn worker_deployment(md: &ModelDeployment, defaults: &WorkerDefaults, replicas: i32) -> Deployment {
    let template = pod_template(md, defaults);
    let mut meta = metadata(md);
    meta.annotations = Some(BTreeMap::from([(
        REVISION_ANNOTATION.to_owned(),
        revision(&template),
    )]));
    Deployment {
        metadata: meta,
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(md)),
                ..LabelSelector::default()
            },
            template,
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                // Bring a new worker up before taking one down: a model load is slow.
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

/// The Service in front of the worker pods; the dispatcher finds ready pods through its
/// EndpointSlices.
pub fn worker_service(md: &ModelDeployment) -> Service {
    Service {
        metadata: metadata(md),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(md)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: WORKER_PORT,
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::{
        HostPathSource, ModelDeploymentSpec, ModelSpec, PvcSource, RuntimeSpec, WorkerResources,
    };

    fn defaults() -> WorkerDefaults {
        WorkerDefaults {
            image: "atomic-worker:test".to_owned(),
            image_pull_policy: "IfNotPresent".to_owned(),
        }
    }

    fn model(gpu: u32) -> ModelDeployment {
        let mut md = ModelDeployment::new(
            "intent",
            ModelDeploymentSpec {
                model: ModelSpec {
                    source: crate::api::model::ModelSource {
                        persistent_volume_claim: Some(PvcSource {
                            claim_name: "models".to_owned(),
                            path: "all-MiniLM-L6-v2".to_owned(),
                        }),
                        host_path: None,
                    },
                    task: Some(crate::api::Operation::Classify),
                    labels: vec!["billing".to_owned(), "other".to_owned()],
                },
                resources: Some(WorkerResources {
                    gpu,
                    cpu: Some("2".to_owned()),
                    memory: Some("4Gi".to_owned()),
                }),
                ..ModelDeploymentSpec::default()
            },
        );
        md.metadata.namespace = Some("ns".to_owned());
        md.metadata.uid = Some("uid-1".to_owned());
        md
    }

    #[test]
    fn deployment_is_hardened_and_owned() {
        let md = model(0);
        let d = worker_deployment(&md, &defaults(), 3);
        assert_eq!(d.metadata.name.as_deref(), Some("intent-worker"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "ModelDeployment");
        assert_eq!(owner.controller, Some(true));
        let spec = d.spec;
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &["ALL"]);
        assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some() && c.startup_probe.is_some());
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(args.contains("--model-dir /models/all-MiniLM-L6-v2"), "{args}");
        assert!(
            args.contains("--task classify") && args.contains("--labels billing,other"),
            "{args}"
        );
        assert!(pod.tolerations.is_none());
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert!(!limits.contains_key("nvidia.com/gpu"));
        assert!(
            !args.contains("--kernel-cache-dir"),
            "CPU workers compile no kernels: {args}"
        );
    }

    #[test]
    fn runtime_settings_become_worker_flags() {
        let mut md = model(1);
        md.spec.runtime = Some(RuntimeSpec {
            precision: Some(crate::api::model::Precision::Bf16),
            max_batch_tokens: Some(4096),
            max_concurrent_requests: None,
            cuda_graph_max_batch: Some(32),
        });
        let d = worker_deployment(&md, &defaults(), 1);
        let args = d.spec.template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap()
            .join(" ");
        for flag in [
            "--precision bf16",
            "--max-batch-tokens 4096",
            "--cuda-graph-max-batch 32",
            "--device cuda:0",
            "--kernel-cache-dir /tmp/atomic-worker-kernels",
        ] {
            assert!(args.contains(flag), "{flag} missing: {args}");
        }
        assert!(!args.contains("--max-concurrent-requests"), "{args}");
    }

    #[test]
    fn gpu_workers_request_gpus_and_tolerate_gpu_taints() {
        let d = worker_deployment(&model(2), &defaults(), 1);
        let pod = d.spec.template.spec.unwrap();
        let limits = pod.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .clone()
            .unwrap();
        assert_eq!(limits["nvidia.com/gpu"], Quantity("2".to_owned()));
        assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("nvidia.com/gpu"));
        assert!(
            pod.containers[0]
                .args
                .as_ref()
                .unwrap()
                .contains(&"cuda:0".to_owned())
        );
    }

    #[test]
    fn host_path_models_mount_the_folder_itself() {
        let mut md = model(0);
        md.spec.model.source = crate::api::model::ModelSource {
            persistent_volume_claim: None,
            host_path: Some(HostPathSource {
                path: "/data/minilm".to_owned(),
            }),
        };
        let pod = worker_deployment(&md, &defaults(), 1).spec.template.spec.unwrap();
        let vol = &pod.volumes.unwrap()[0];
        assert_eq!(vol.host_path.as_ref().unwrap().path, "/data/minilm");
        assert!(
            pod.containers[0]
                .args
                .as_ref()
                .unwrap()
                .join(" ")
                .contains("--model-dir /models ")
        );
    }

    #[test]
    fn revision_changes_with_the_template_only() {
        let md = model(0);
        let a = worker_deployment(&md, &defaults(), 1);
        let b = worker_deployment(&md, &defaults(), 5);
        let annotation =
            |d: &Deployment| d.metadata.annotations.as_ref().unwrap()[REVISION_ANNOTATION].clone();
        assert_eq!(
            annotation(&a),
            annotation(&b),
            "replica count is not a new revision"
        );
        let mut other = md.clone();
        other.spec.image = Some("atomic-worker:v2".to_owned());
        assert_ne!(
            annotation(&a),
            annotation(&worker_deployment(&other, &defaults(), 1))
        );
    }

    #[test]
    fn service_selects_the_worker_pods() {
        let md = model(0);
        let svc = worker_service(&md);
        let d = worker_deployment(&md, &defaults(), 1);
        assert_eq!(svc.spec.unwrap().selector, d.spec.selector.match_labels);
        assert_eq!(
            selector_string(&md),
            "app.kubernetes.io/instance=intent,app.kubernetes.io/name=atomic-worker,atomic.dev/model=intent"
        );
    }
}
