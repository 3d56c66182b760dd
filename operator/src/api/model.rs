//! The `ModelDeployment` custom resource: a transformer model served by worker pods, with
//! replica bounds that the operator scales within from queue depth (scale from zero).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::task::Operation;

/// Default queue depth one replica is expected to absorb.
pub const DEFAULT_TARGET_QUEUE_DEPTH: u32 = 32;
/// Default number of tasks the operator keeps in flight on one worker pod.
pub const DEFAULT_MAX_IN_FLIGHT_PER_REPLICA: u32 = 8;
/// Default wait before scaling down after the load drops.
pub const DEFAULT_SCALE_DOWN_DELAY_SECONDS: u32 = 300;
/// Port the worker's HTTP API listens on.
pub const WORKER_PORT: i32 = 8080;

/// A transformer model served by worker pods.
#[allow(clippy::duplicated_attributes)] // several printer columns share a type
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "atomic.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    status = "ModelDeploymentStatus",
    shortname = "md",
    category = "atomic",
    derive = "PartialEq",
    derive = "Default",
    doc = "A transformer model served by autoscaled worker pods.",
    scale(
        spec_replicas_path = ".spec.replicas.min",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas"),
    printcolumn(name = "Queue", type_ = "integer", json_path = ".status.queueDepth"),
    printcolumn(
        name = "Revision",
        type_ = "string",
        json_path = ".status.revision",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The model files and what they are used for.
    pub model: ModelSpec,
    /// Replica bounds and autoscaling.
    #[serde(default)]
    pub replicas: ReplicaPolicy,
    /// Compute resources of one worker pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<WorkerResources>,
    /// Worker runtime settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeSpec>,
    /// Worker image; defaults to the operator's `--worker-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// The model files and their use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Where the Hugging Face model folder (model.safetensors, config.json, tokenizer.json) is.
    pub source: ModelSource,
    /// What the model serves; inferred from config.json by the worker when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Operation>,
    /// Labels for classification (zero-shot by embedding similarity when the model has no head).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// Where model files come from. Exactly one field is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.persistentVolumeClaim), has(self.hostPath)].filter(x, x).size() == 1")
    .message("model.source needs exactly one of persistentVolumeClaim and hostPath"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// A folder inside a PersistentVolumeClaim, mounted read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PvcSource>,
    /// A folder on the node, mounted read-only (development clusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
}

/// A folder inside a PersistentVolumeClaim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Claim name in the ModelDeployment's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Folder inside the volume; the volume root when empty.
    #[serde(default)]
    #[schemars(regex(pattern = r"^[^/].*$|^$"))]
    pub path: String,
}

/// A folder on the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
pub struct HostPathSource {
    /// Absolute path on the node.
    #[schemars(regex(pattern = r"^/"))]
    pub path: String,
}

/// Replica bounds and queue-depth autoscaling.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.min <= self.max").message("replicas.min must not exceed replicas.max"))]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPolicy {
    /// Fewest replicas; 0 allows scale to zero when no task waits. `kubectl scale` sets this.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min: i32,
    /// Most replicas.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
    /// Queued plus running tasks one replica is expected to absorb.
    #[serde(default = "default_target_queue_depth")]
    #[schemars(range(min = 1))]
    pub target_queue_depth_per_replica: u32,
    /// Tasks the operator keeps in flight on one worker pod at once.
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_in_flight_per_replica: u32,
    /// Load must stay low this long before replicas are removed.
    #[serde(default = "default_scale_down_delay")]
    pub scale_down_delay_seconds: u32,
}

fn default_min_replicas() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    1
}
fn default_target_queue_depth() -> u32 {
    DEFAULT_TARGET_QUEUE_DEPTH
}
fn default_max_in_flight() -> u32 {
    DEFAULT_MAX_IN_FLIGHT_PER_REPLICA
}
fn default_scale_down_delay() -> u32 {
    DEFAULT_SCALE_DOWN_DELAY_SECONDS
}

impl Default for ReplicaPolicy {
    fn default() -> Self {
        ReplicaPolicy {
            min: default_min_replicas(),
            max: default_max_replicas(),
            target_queue_depth_per_replica: DEFAULT_TARGET_QUEUE_DEPTH,
            max_in_flight_per_replica: DEFAULT_MAX_IN_FLIGHT_PER_REPLICA,
            scale_down_delay_seconds: DEFAULT_SCALE_DOWN_DELAY_SECONDS,
        }
    }
}

/// Compute resources of one worker pod. Requests equal limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerResources {
    /// NVIDIA GPUs (`nvidia.com/gpu`); 0 or unset runs on CPU.
    #[serde(default)]
    #[schemars(range(max = 16))]
    pub gpu: u32,
    /// CPU quantity, e.g. `2` or `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?m?$"))]
    pub cpu: Option<String>,
    /// Memory quantity, e.g. `4Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[eE][0-9]+)?$"))]
    pub memory: Option<String>,
}

/// Worker runtime settings, passed to the worker as flags.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    /// Numeric precision of the forward pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// Token budget of one batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_batch_tokens: Option<u32>,
    /// Requests the worker admits at once before answering 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent_requests: Option<u32>,
    /// GPU workers of decoders: decode steps of up to this many sequences are recorded as CUDA
    /// graphs, once per batch size, and replayed (fewer launches per token). 0 or unset: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1024))]
    pub cuda_graph_max_batch: Option<u32>,
}

/// Numeric precision of the forward pass.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats.
    Fp32,
    /// IEEE half precision.
    Fp16,
    /// bfloat16.
    Bf16,
}

impl Precision {
    /// The name the worker's `--precision` flag takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Coarse state of a ModelDeployment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum ModelPhase {
    /// Children not created yet.
    #[default]
    Pending,
    /// Replicas are starting or rolling out.
    Progressing,
    /// At least one replica serves.
    Ready,
    /// No replica runs because no task waits (min is 0).
    ScaledToZero,
}

/// Observed state of a ModelDeployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// Coarse state.
    #[serde(default)]
    pub phase: ModelPhase,
    /// Replicas of the worker Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Replicas that pass their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas the autoscaler asks for.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Tasks of this model waiting for a worker.
    #[serde(default)]
    pub queue_depth: u32,
    /// Tasks of this model in flight on workers.
    #[serde(default)]
    pub in_flight: u32,
    /// Hash of the worker pod template; changes when the spec changes what pods run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Label selector of the worker pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// When the autoscaler last changed the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// The spec generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Available` and `Progressing`, as on a Deployment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
