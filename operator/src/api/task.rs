//! The `AtomicTask` custom resource: one unit of AI work (embed, classify, extract, generate, or
//! an HTTP call) and the status that says exactly where it is and why.
//!
//! Validation that the API server can do lives in the schema (enums, minimums, CEL rules), so a
//! malformed manifest is rejected by `kubectl apply` before the operator ever sees it. The same
//! rules run client-side in the local runner through `kube::core::cel`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Per-attempt timeout when `timeoutSeconds` is not set.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 60;
/// Retry limit when `retries` is not set: one retry after the first failure.
pub const DEFAULT_RETRY_LIMIT: u32 = 1;
/// First backoff delay when `retries.backoffSeconds` is not set.
pub const DEFAULT_BACKOFF_SECONDS: u32 = 5;
/// Cap on the exponential backoff when `retries.maxBackoffSeconds` is not set.
pub const DEFAULT_MAX_BACKOFF_SECONDS: u32 = 300;

/// One unit of AI work on a named ModelDeployment.
#[allow(clippy::duplicated_attributes)] // several printer columns share a type
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "atomic.dev",
    version = "v1alpha1",
    kind = "AtomicTask",
    namespaced,
    status = "AtomicTaskStatus",
    shortname = "at",
    category = "atomic",
    derive = "PartialEq",
    derive = "Default",
    doc = "One unit of AI work (embed, classify, extract, generate or an HTTP call) on a named model.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Operation", type_ = "string", json_path = ".spec.operation"),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Attempts", type_ = "integer", json_path = ".status.attempts"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason", priority = 1),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1),
    selectable = ".spec.model",
    validation = Rule::new("!has(self.spec.dependsOn) || !(self.metadata.name in self.spec.dependsOn)")
        .message("a task may not depend on itself")
)]
#[x_kube(validation = Rule::new("self.operation == 'http' || has(self.model)")
    .message("spec.model is required unless operation is http"))]
#[x_kube(validation = Rule::new("(self.operation == 'http') == has(self.http)")
    .message("spec.http is required for operation http and not allowed otherwise"))]
#[serde(rename_all = "camelCase")]
pub struct AtomicTaskSpec {
    /// Name of the ModelDeployment (same namespace) that runs this task. Required unless
    /// `operation` is `http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,

    /// What the task does.
    pub operation: Operation,

    /// Tasks (same namespace) that must succeed before this one starts. Their results are
    /// available to `prompt` and `http.body` templates as `{{ tasks.NAME.FIELD }}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(x, self.exists_one(y, y == x))").message("dependsOn has duplicates"))]
    pub depends_on: Vec<String>,

    /// Template of the text sent to the model. Placeholders: `{{ input.text }}`,
    /// `{{ tasks.NAME.FIELD }}` (a field of an upstream result, dotted paths allowed) and
    /// `{{ tasks.NAME }}` (the whole upstream result). Defaults to `{{ input.text }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub prompt: Option<String>,

    /// The task's input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<TaskInput>,

    /// Candidate labels for `classify`; they override the ModelDeployment's labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,

    /// Generation parameters for `generate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<GenerationParameters>,

    /// The request for `operation: http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCall>,

    /// Limit on one attempt, in seconds. An attempt that runs longer fails and is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: Option<u32>,

    /// Limit on the whole task from its creation: waiting for dependencies and workers, attempts,
    /// retries and backoff included. When it passes, the task ends in `TimedOut`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<u32>,

    /// Retry policy for failed attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,

    /// Higher runs first among queued tasks of the same model.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// Where the result goes besides the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSpec>,

    /// Delete the task this many seconds after it finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u32>,

    /// Set to true to cancel the task; a running attempt is abandoned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

/// What a task does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Embed the prompt into a vector.
    Embed,
    /// Classify the prompt into one of the labels.
    Classify,
    /// Extract named entities from the prompt.
    Extract,
    /// Generate text from the prompt.
    #[default]
    Generate,
    /// Call an external HTTP endpoint.
    Http,
}

impl Operation {
    /// The lowercase name used in manifests, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Embed => "embed",
            Operation::Classify => "classify",
            Operation::Extract => "extract",
            Operation::Generate => "generate",
            Operation::Http => "http",
        }
    }
}

/// The task's input: inline text or a reference to a ConfigMap or Secret key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.text) != has(self.valueFrom)")
    .message("input needs exactly one of text and valueFrom"))]
#[serde(rename_all = "camelCase")]
pub struct TaskInput {
    /// Inline input text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub text: Option<String>,
    /// Input read from a ConfigMap or Secret in the task's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<InputSource>,
}

/// A reference to a key of a ConfigMap or Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.configMapKeyRef) != has(self.secretKeyRef)")
    .message("valueFrom needs exactly one of configMapKeyRef and secretKeyRef"))]
#[serde(rename_all = "camelCase")]
pub struct InputSource {
    /// A key of a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
    /// A key of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
}

/// Names one key of a ConfigMap or Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct KeyRef {
    /// Object name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the object.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Sampling parameters for `generate`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct GenerationParameters {
    /// Most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32768))]
    pub max_tokens: Option<u32>,
    /// Sampling temperature; 0 is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub top_p: Option<f64>,
    /// Sample among the k most likely tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub top_k: Option<u32>,
    /// Random seed; the same seed gives the same text on the same model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Generation stops before any of these strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

/// An HTTP request made by `operation: http` (the "call an API" step of a pipeline).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpCall {
    /// Target URL (http or https).
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// HTTP method.
    #[serde(default)]
    pub method: HttpMethod,
    /// Extra request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Request body template, rendered like `prompt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// A Secret whose key `token` is sent as `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
}

/// HTTP method of an `http` task or webhook.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// POST (the default).
    #[default]
    Post,
    /// PUT.
    Put,
    /// GET; the body is not sent.
    Get,
}

/// Retry policy for failed attempts: exponential backoff from `backoffSeconds`, doubling each
/// time, capped at `maxBackoffSeconds`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retries.
    #[serde(default = "default_retry_limit")]
    #[schemars(range(max = 100))]
    pub limit: u32,
    /// Delay before the first retry.
    #[serde(default = "default_backoff_seconds")]
    #[schemars(range(max = 86400))]
    pub backoff_seconds: u32,
    /// Upper bound on the delay between retries.
    #[serde(default = "default_max_backoff_seconds")]
    #[schemars(range(max = 86400))]
    pub max_backoff_seconds: u32,
}

fn default_retry_limit() -> u32 {
    DEFAULT_RETRY_LIMIT
}
fn default_backoff_seconds() -> u32 {
    DEFAULT_BACKOFF_SECONDS
}
fn default_max_backoff_seconds() -> u32 {
    DEFAULT_MAX_BACKOFF_SECONDS
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            limit: DEFAULT_RETRY_LIMIT,
            backoff_seconds: DEFAULT_BACKOFF_SECONDS,
            max_backoff_seconds: DEFAULT_MAX_BACKOFF_SECONDS,
        }
    }
}

/// Where a task's result goes besides its status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// A ConfigMap (created if missing) that receives the result under the task's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// An endpoint that receives the result as JSON, with an `Idempotency-Key` header that is
    /// the same for every delivery of this task's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

/// An HTTP endpoint that receives results.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// Target URL (http or https).
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// A Secret whose key `token` is sent as `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
}

/// Where a task is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum TaskPhase {
    /// Accepted, not yet examined.
    #[default]
    Pending,
    /// Waiting for dependencies to succeed.
    Blocked,
    /// Ready and waiting for a worker (or for its retry backoff to pass).
    Queued,
    /// An attempt is in flight.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished without a result; `reason` and `message` say why.
    Failed,
    /// Ran out of time (attempt timeouts with no retries left, or the active deadline).
    TimedOut,
    /// Cancelled by `spec.cancel` or deletion.
    Cancelled,
}

impl TaskPhase {
    /// Every phase, in life order.
    pub const ALL: [TaskPhase; 8] = [
        TaskPhase::Pending,
        TaskPhase::Blocked,
        TaskPhase::Queued,
        TaskPhase::Running,
        TaskPhase::Succeeded,
        TaskPhase::Failed,
        TaskPhase::TimedOut,
        TaskPhase::Cancelled,
    ];

    /// True for the phases a task never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskPhase::Succeeded | TaskPhase::Failed | TaskPhase::TimedOut | TaskPhase::Cancelled
        )
    }

    /// The phase name as written in the status.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskPhase::Pending => "Pending",
            TaskPhase::Blocked => "Blocked",
            TaskPhase::Queued => "Queued",
            TaskPhase::Running => "Running",
            TaskPhase::Succeeded => "Succeeded",
            TaskPhase::Failed => "Failed",
            TaskPhase::TimedOut => "TimedOut",
            TaskPhase::Cancelled => "Cancelled",
        }
    }
}

/// Observed state of an AtomicTask.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AtomicTaskStatus {
    /// Where the task is.
    #[serde(default)]
    pub phase: TaskPhase,
    /// Attempts started so far.
    #[serde(default)]
    pub attempts: u32,
    /// Attempts lost before they reported (operator restart, worker gone); they are retried at
    /// once and do not count against `retries.limit`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_attempts: u32,
    /// Worker endpoint of the latest attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// When the task entered the queue for its latest attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_time: Option<Time>,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the latest attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_start_time: Option<Time>,
    /// Earliest time of the next attempt while backing off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,
    /// When the task reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The result, when it is small enough to keep in the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub result: Option<serde_json::Value>,
    /// Where a large result is stored instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_ref: Option<KeyRef>,
    /// Machine-readable reason of the latest transition, e.g. `DependencyFailed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable explanation of the latest transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The spec generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready` (true once succeeded) and `OutputDelivered`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Schema for a free-form JSON value (`x-kubernetes-preserve-unknown-fields`).
pub(crate) fn any_json(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}
