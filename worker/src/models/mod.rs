//! Transformer architectures, each written once against [`crate::backend::Backend`] and named
//! after the Hugging Face implementation it mirrors.

pub mod bert;
pub mod decoder;
pub mod gpt2;
pub mod kv_cache;
pub mod llama;
