//! `atomic-worker` library: turns a model folder on disk into typed, validated pieces
//! (configuration, tokenizer, pooling, memory-mapped weights) and runs the models on a compute
//! [`backend`].
//!
//! The crate has one error type, [`Error`]. Every variant names the file it concerns (and the
//! tensor or field where there is one), because the person reading the message is usually an
//! operator looking at a ModelDeployment that will not start, not someone with a debugger.

use std::path::PathBuf;

pub mod alloc;
pub mod backend;
pub mod config;
pub mod model_dir;
pub mod models;
pub mod sampling;
pub mod server;
pub mod tasks;
pub mod tokenizer;
pub mod weights;

pub use config::{ModelConfig, PoolingConfig};
pub use model_dir::ModelDir;
pub use tokenizer::{Encoding, Tokenizer};
pub use weights::Weights;

/// Everything that can go wrong while loading a model. Each variant carries the path of the file
/// involved, so a message is actionable without further context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that the model folder must contain is not there.
    #[error("{}: file not found", path.display())]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
    },

    /// Reading (or memory-mapping) a file failed for a reason other than its absence.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying operating-system error.
        source: std::io::Error,
    },

    /// A configuration file is not valid JSON or not shaped as expected as a whole.
    #[error("{}: {message}", path.display())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// One field of a configuration file is missing, mistyped or out of range.
    #[error("{}: field `{field}`: {message}", path.display())]
    ConfigField {
        /// The configuration file.
        path: PathBuf,
        /// The JSON field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },

    /// The configuration names an architecture this worker does not run.
    #[error("{}: unsupported architecture `{name}`", path.display())]
    UnsupportedArchitecture {
        /// The configuration file.
        path: PathBuf,
        /// The architecture (or `model_type`) it asks for.
        name: String,
    },

    /// A weights file is not a valid safetensors file (or index of shards).
    #[error("{}: {message}", path.display())]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A tensor the model needs is not in the weights.
    #[error("{}: tensor `{name}` not found", path.display())]
    MissingTensor {
        /// The weights file (or shard index) searched.
        path: PathBuf,
        /// The tensor name asked for.
        name: String,
    },

    /// A tensor has a different shape than the configuration implies.
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?}", path.display())]
    TensorShape {
        /// The weights file holding the tensor.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },

    /// A tensor is stored in an element type that cannot be converted to `f32`.
    #[error("{}: tensor `{name}` has unsupported dtype {dtype}", path.display())]
    TensorDtype {
        /// The weights file holding the tensor.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The element type stored in the file.
        dtype: String,
    },

    /// A tokenizer file could not be loaded, or the tokenizer failed on an input.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// A compute operation failed (shape mismatch, out-of-range token id, device error). The
    /// message holds the backend's; it is not also a `source`, which would print it twice in a
    /// chain (`{:#}`).
    #[error("backend: {0}")]
    Backend(backend::BackendError),

    /// The worker cannot serve the model as configured (wrong task or labels for the model,
    /// a thread that could not start).
    #[error("{0}")]
    Setup(String),

    /// A request's input cannot be run on the model (too long, wrong head, unsupported mode).
    #[error("{0}")]
    Input(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the device ran out of memory: that pass failed, the device stays usable.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Backend(backend::BackendError::OutOfMemory(_)))
    }
}

impl From<backend::BackendError> for Error {
    fn from(e: backend::BackendError) -> Self {
        Error::Backend(e)
    }
}

impl Error {
    /// Wraps an I/O error on `path`, turning "not found" into [`Error::MissingFile`] because
    /// that is by far the most common case and deserves the plainest message.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile { path }
        } else {
            Error::Io { path, source }
        }
    }
}
