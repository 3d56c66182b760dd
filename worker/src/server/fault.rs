//! The record of a failed compute device. A device error (as opposed to a bad input, or running
//! out of device memory, which fails one pass and leaves the device usable) can leave a GPU
//! context unusable for every later call: a kernel that trapped, a lost device. The model
//! threads record the first one here; from then on `/ready` and `/health` answer 503 with the
//! reason (so the pod leaves the Service and its liveness probe restarts it with a fresh
//! context) and new requests are refused at once instead of failing one by one.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use super::split::Pass;
use crate::Error;
use crate::backend::BackendError;

/// The first device failure, shared by the model threads and the handlers.
#[derive(Clone, Debug, Default)]
pub struct DeviceFault(Arc<OnceLock<String>>);

impl DeviceFault {
    /// No failure yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `error` if it is a device failure (the first one wins); whether it was one.
    pub fn note(&self, error: &Error) -> bool {
        match error {
            Error::Backend(BackendError::Device(message)) => {
                if self.0.set(message.clone()).is_ok() {
                    tracing::error!(%message, "the compute device failed; the worker needs a restart");
                }
                true
            }
            _ => false,
        }
    }

    /// The recorded failure, if any.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    /// Runs one forward pass of a model thread and says how it ended, as the batch splitting
    /// needs it: a device failure (recorded here), running out of device memory, another
    /// error (each described by `describe`) or a panic (`panicked`).
    pub fn run_pass<T, E>(
        &self,
        pass: impl FnOnce() -> crate::Result<Vec<T>>,
        describe: impl Fn(&Error) -> E,
        panicked: impl FnOnce() -> E,
    ) -> Pass<T, E> {
        match std::panic::catch_unwind(AssertUnwindSafe(pass)) {
            Ok(Ok(out)) => Pass::Ran(out),
            Ok(Err(e)) if self.note(&e) => Pass::DeviceFailed(describe(&e)),
            Ok(Err(e)) if e.is_out_of_memory() => Pass::OutOfMemory(describe(&e)),
            Ok(Err(e)) => Pass::Failed(describe(&e)),
            Err(_) => Pass::Failed(panicked()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_device_errors_are_recorded_and_the_first_one_stays() {
        let fault = DeviceFault::new();
        assert!(!fault.note(&Error::Input("too long".to_owned())));
        let shape = BackendError::Shape {
            op: "linear",
            detail: "x".to_owned(),
        };
        assert!(!fault.note(&Error::Backend(shape)));
        let oom = BackendError::OutOfMemory("allocating a tensor of 1 GiB: out of GPU memory".to_owned());
        assert!(
            !fault.note(&Error::Backend(oom)),
            "out of memory is not a device failure"
        );
        assert_eq!(fault.get(), None);
        let first = Error::Backend(BackendError::Device(
            "launching softmax: illegal address".to_owned(),
        ));
        assert!(fault.note(&first));
        assert!(
            fault
                .clone()
                .note(&Error::Backend(BackendError::Device("later".to_owned())))
        );
        assert_eq!(fault.get(), Some("launching softmax: illegal address"));
    }
}
