//! The Atomic inference worker: model runtime and the compute backends it runs on.

pub mod backend;
