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
    /// How many alternatives to generate (default 1). Choice `i` samples with `seed + i`, so a
    /// seeded request is reproducible choice by choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
}

/// `stream_options` of a streaming request.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StreamOptions {
    /// Send a last chunk, before `data: [DONE]`, with no choices and the request's usage.
    #[serde(default)]
    pub include_usage: bool,
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
    /// Return the log-probabilities of each generated token and of this many most likely
    /// alternatives (0 to 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// Whether to stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// Options of a streamed answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
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
    /// Generated alternatives (`n` of them).
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
    /// Log-probabilities of the generated tokens, when the request asked for them.
    #[serde(default)]
    pub logprobs: Option<CompletionLogprobs>,
    /// Why generation stopped: `"stop"` or `"length"`. OpenAI allows null, so it is optional.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// Log-probabilities of a completion, in the completions API's column layout: entry `i` of each
/// list describes generated token `i`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct CompletionLogprobs {
    /// The tokens' text.
    pub tokens: Vec<String>,
    /// Each token's natural-log probability under the model.
    pub token_logprobs: Vec<f64>,
    /// The most likely alternatives at each position, token text to log-probability.
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f64>>,
    /// Byte offset of each token's text in the completion text.
    pub text_offset: Vec<usize>,
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
    /// Return the log-probability of each generated token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logprobs: bool,
    /// With `logprobs`, also this many most likely alternatives per token (0 to 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// Whether to stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// Options of a streamed answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
}

/// One message of a chat.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text. Requests may also give OpenAI's list of content parts; the text parts
    /// are joined with newlines, and any other part (an image, audio) is rejected by name.
    #[serde(deserialize_with = "content_text")]
    pub content: String,
}

/// Reads a message's `content`: a string, or a list of `{"type": "text", "text": ...}` parts.
fn content_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    use serde::de::Error;

    /// One content part; other fields (`image_url`, `input_audio`) are ignored, the type decides.
    #[derive(Deserialize)]
    struct Part {
        #[serde(rename = "type")]
        kind: Option<String>,
        text: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Part>),
    }
    match Content::deserialize(deserializer) {
        Ok(Content::Text(text)) => Ok(text),
        Ok(Content::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match (part.kind.as_deref(), part.text) {
                    (Some("text"), Some(text)) => texts.push(text),
                    (Some("text"), None) => {
                        return Err(D::Error::custom("a `text` content part needs a string `text`"));
                    }
                    (Some(other), _) => {
                        return Err(D::Error::custom(format!(
                            "content parts of type `{other}` are not supported; only `text` is"
                        )));
                    }
                    (None, _) => return Err(D::Error::custom("a content part has no `type`")),
                }
            }
            Ok(texts.join("\n"))
        }
        Err(_) => Err(D::Error::custom(
            "`content` must be a string or a list of content parts",
        )),
    }
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
    /// Generated alternatives (`n` of them).
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
    /// Log-probabilities of the generated tokens, when the request asked for them.
    #[serde(default)]
    pub logprobs: Option<ChatLogprobs>,
    /// Why generation stopped: `"stop"` or `"length"`.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// Log-probabilities of a chat answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// One generated token of a chat answer with its log-probability and the likeliest alternatives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability under the model.
    pub logprob: f64,
    /// The raw bytes the token stands for (part of a UTF-8 character, for a token that splits
    /// one: then `token` shows U+FFFD).
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position (`top_logprobs` of them), likeliest first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// An alternative token and its log-probability.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f64,
    /// The raw bytes the token stands for.
    pub bytes: Vec<u8>,
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

    #[test]
    fn chat_content_takes_a_string_or_text_parts() {
        let text: ChatMessage = serde_json::from_value(json!({"role": "user", "content": "hi"})).unwrap();
        assert_eq!(text.content, "hi");
        let parts: ChatMessage = serde_json::from_value(json!({"role": "user", "content": [
            {"type": "text", "text": "first"},
            {"type": "text", "text": "second"}
        ]}))
        .unwrap();
        assert_eq!(parts.content, "first\nsecond");
        // Serialised back as the plain string.
        assert_eq!(
            serde_json::to_value(&parts).unwrap(),
            json!({"role": "user", "content": "first\nsecond"})
        );
        let image = serde_json::from_value::<ChatMessage>(json!({"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "x"}}
        ]}))
        .unwrap_err();
        assert!(
            image.to_string().contains("`image_url` are not supported"),
            "{image}"
        );
        for bad in [
            json!(null),
            json!(3),
            json!([{"text": "no type"}]),
            json!([{"type": "text"}]),
        ] {
            let err = serde_json::from_value::<ChatMessage>(json!({"role": "user", "content": bad}));
            assert!(err.is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn streaming_and_logprob_fields_round_trip() {
        let req: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "m", "messages": [], "n": 2, "logprobs": true, "top_logprobs": 3,
            "stream": true, "stream_options": {"include_usage": true}
        }))
        .unwrap();
        assert_eq!(req.sampling.n, Some(2));
        assert!(req.logprobs && req.stream);
        assert_eq!(req.top_logprobs, Some(3));
        assert_eq!(req.stream_options, Some(StreamOptions { include_usage: true }));
        let req: CompletionRequest =
            serde_json::from_value(json!({"model": "m", "prompt": "p", "logprobs": 2})).unwrap();
        assert_eq!(req.logprobs, Some(2));
        assert!(!req.stream);
    }
}
