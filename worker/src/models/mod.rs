//! Transformer architectures, each written once against [`crate::backend::Backend`] and named
//! after the Hugging Face implementation it mirrors.

pub mod bert;
