//! The JSON wire types of the worker HTTP API, in one place so that the operator (client) and the
//! worker (server) cannot drift apart.
//!
//! The shapes follow the OpenAI API where it has an equivalent (`/v1/embeddings`,
//! `/v1/completions`, the error body), so that an OpenAI-compatible server can stand in for a
//! worker for those operations. `/v1/classify` and `/v1/extract` are Atomic's own. Only serde is
//! used here (no kube types), so the worker depends on this crate without pulling in the
//! Kubernetes machinery.

use serde::{Deserialize, Serialize};

/// Path of the embeddings endpoint.
pub const EMBEDDINGS_PATH: &str = "/v1/embeddings";
/// Path of the completions (text generation) endpoint.
pub const COMPLETIONS_PATH: &str = "/v1/completions";
/// Path of the classification endpoint.
pub const CLASSIFY_PATH: &str = "/v1/classify";
/// Path of the entity extraction endpoint.
pub const EXTRACT_PATH: &str = "/v1/extract";
/// Path of the chat completions endpoint.
pub const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";
/// Path of the tokenization endpoint.
pub const TOKENIZE_PATH: &str = "/v1/tokenize";
/// Path of the model listing endpoint.
pub const MODELS_PATH: &str = "/v1/models";

/// `POST /v1/embeddings` request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EmbeddingRequest {
    /// Model name.
    pub model: String,
    /// Text (or texts) to embed.
    pub input: EmbeddingInput,
}

/// The `input` of an embeddings request: one string or a batch, as OpenAI accepts both.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// A single text.
    One(String),
    /// A batch of texts; the response has one embedding per text, in `index` order.
    Many(Vec<String>),
}

/// `POST /v1/embeddings` response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EmbeddingResponse {
    /// Always `"list"`.
    pub object: String,
    /// One embedding per input text.
    pub data: Vec<Embedding>,
    /// Model that produced the embeddings.
    pub model: String,
    /// Token accounting.
    pub usage: EmbeddingUsage,
}

/// One embedding vector of an [`EmbeddingResponse`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Embedding {
    /// Always `"embedding"`.
    pub object: String,
    /// Position of the input text this vector belongs to.
    pub index: u32,
    /// The vector.
    pub embedding: Vec<f32>,
}

/// Token accounting of an embeddings call.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EmbeddingUsage {
    /// Tokens in the input.
    pub prompt_tokens: u32,
    /// Tokens processed in total.
    pub total_tokens: u32,
}

/// The sampling fields that completion and chat requests share.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SamplingOptions {
    /// Most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature; 0 is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Sample among the k most likely tokens (not in OpenAI's API; vLLM and others accept it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Random seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Generation stops before any of these strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

/// `POST /v1/completions` request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct CompletionRequest {
    /// Model name.
    pub model: String,
    /// Text to continue.
    pub prompt: String,
    /// How to sample; flattened, so the fields sit at the top level as in OpenAI's API.
    #[serde(flatten)]
    pub sampling: SamplingOptions,
}

/// `POST /v1/completions` response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CompletionResponse {
    /// Identifier of this completion.
    pub id: String,
    /// Always `"text_completion"`.
    pub object: String,
    /// Unix time (seconds) of creation.
    pub created: u64,
    /// Model that generated the text.
    pub model: String,
    /// Generated alternatives; Atomic asks for one.
    pub choices: Vec<CompletionChoice>,
    /// Token accounting.
    pub usage: CompletionUsage,
}

/// One generated alternative of a [`CompletionResponse`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CompletionChoice {
    /// Position among the choices.
    pub index: u32,
    /// Generated text.
    pub text: String,
    /// Why generation stopped: `"stop"` or `"length"`. OpenAI allows null, so it is optional.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// Token accounting of a completions call.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CompletionUsage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Sum of both.
    pub total_tokens: u32,
}

/// `POST /v1/classify` request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ClassifyRequest {
    /// Model name.
    pub model: String,
    /// Text to classify.
    pub input: String,
    /// Candidate labels; when empty the model's own labels are used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// `POST /v1/classify` response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ClassifyResponse {
    /// Model that classified the text.
    pub model: String,
    /// The best label.
    pub label: String,
    /// Score of the best label.
    pub score: f64,
    /// Score of every candidate label, best first.
    pub scores: Vec<LabelScore>,
}

/// A label and its score.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LabelScore {
    /// The label.
    pub label: String,
    /// Its score in `[0, 1]`.
    pub score: f64,
}

/// `POST /v1/extract` request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ExtractRequest {
    /// Model name.
    pub model: String,
    /// Text to extract entities from.
    pub input: String,
}

/// `POST /v1/extract` response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ExtractResponse {
    /// Model that extracted the entities.
    pub model: String,
    /// Entities in order of appearance.
    pub entities: Vec<Entity>,
}

/// One entity found in the input.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Entity {
    /// Entity type, e.g. `ORDER` or `PRODUCT`.
    #[serde(rename = "type")]
    pub entity_type: String,
    /// The entity's text as it appears in the input.
    pub text: String,
    /// Byte offset of the first byte in the input.
    pub start: usize,
    /// Byte offset one past the last byte in the input.
    pub end: usize,
    /// Confidence in `[0, 1]`.
    pub score: f64,
}

/// `POST /v1/chat/completions` request (OpenAI's shape, non-streaming fields).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ChatCompletionRequest {
    /// Model name.
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// How to sample; flattened, so the fields sit at the top level as in OpenAI's API.
    #[serde(flatten)]
    pub sampling: SamplingOptions,
    /// Whether to stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// One message of a chat.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// `POST /v1/chat/completions` response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatCompletionResponse {
    /// Identifier of this completion.
    pub id: String,
    /// Always `"chat.completion"`.
    pub object: String,
    /// Unix time (seconds) of creation.
    pub created: u64,
    /// Model that generated the answer.
    pub model: String,
    /// Generated alternatives; Atomic asks for one.
    pub choices: Vec<ChatChoice>,
    /// Token accounting.
    pub usage: CompletionUsage,
}

/// One generated alternative of a [`ChatCompletionResponse`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatChoice {
    /// Position among the choices.
    pub index: u32,
    /// The assistant's message.
    pub message: ChatMessage,
    /// Why generation stopped: `"stop"` or `"length"`.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// `POST /v1/tokenize` request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenizeRequest {
    /// Model name.
    pub model: String,
    /// Text (or texts) to tokenize.
    pub input: EmbeddingInput,
}

/// `POST /v1/tokenize` response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenizeResponse {
    /// Model whose tokenizer was used.
    pub model: String,
    /// One entry per input text, in `index` order.
    pub data: Vec<TokenizedText>,
}

/// The tokens of one input text.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenizedText {
    /// Position of the input text.
    pub index: u32,
    /// Its tokens, special tokens included, after truncation to the model's limit.
    pub tokens: Vec<Token>,
}

/// One token of a [`TokenizedText`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Token {
    /// Token id.
    pub id: u32,
    /// The vocabulary entry of the id.
    pub text: String,
    /// Whether the tokenizer added it (e.g. `[CLS]`); special tokens have `start == end == 0`.
    pub special: bool,
    /// Byte offset of the first byte it covers in the input.
    pub start: usize,
    /// Byte offset one past the last byte it covers.
    pub end: usize,
}

/// `GET /v1/models` response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelList {
    /// Always `"list"`.
    pub object: String,
    /// The models served.
    pub data: Vec<ModelCard>,
}

/// One model of a [`ModelList`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelCard {
    /// The name requests use in `model`.
    pub id: String,
    /// Always `"model"`.
    pub object: String,
    /// Unix time (seconds) the server started.
    pub created: u64,
    /// Owner, `"atomic"`.
    pub owned_by: String,
}

/// Body of every non-2xx answer, as OpenAI sends it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The `error` object of an [`ErrorResponse`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorDetail {
    /// Human-readable explanation.
    pub message: String,
    /// Error class, e.g. `invalid_request_error` or `server_error`.
    #[serde(rename = "type")]
    pub error_type: String,
    /// Machine-readable code, e.g. `model_not_found`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn embedding_input_accepts_string_or_list() {
        let one: EmbeddingRequest = serde_json::from_value(json!({"model": "m", "input": "hi"})).unwrap();
        assert_eq!(one.input, EmbeddingInput::One("hi".into()));
        let many: EmbeddingRequest =
            serde_json::from_value(json!({"model": "m", "input": ["a", "b"]})).unwrap();
        assert_eq!(many.input, EmbeddingInput::Many(vec!["a".into(), "b".into()]));
    }

    #[test]
    fn entity_and_error_use_type_key() {
        let e = Entity {
            entity_type: "ORDER".into(),
            text: "A-1".into(),
            start: 0,
            end: 3,
            score: 0.5,
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"type": "ORDER", "text": "A-1", "start": 0, "end": 3, "score": 0.5})
        );
        let err: ErrorResponse =
            serde_json::from_value(json!({"error": {"message": "no", "type": "invalid_request_error"}}))
                .unwrap();
        assert_eq!(err.error.code, None);
        assert_eq!(err.error.error_type, "invalid_request_error");
    }

    #[test]
    fn completion_request_omits_unset_parameters() {
        let req = CompletionRequest {
            model: "m".into(),
            prompt: "p".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({"model": "m", "prompt": "p"})
        );
    }
}
