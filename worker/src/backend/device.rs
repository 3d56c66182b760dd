//! Which device the worker computes on: the `--device auto|cpu|cuda:N` setting and the rules for
//! falling back from a GPU to the CPU. Pure: opening the GPU is passed in as a function, so the
//! rules are tested on every machine, with or without CUDA.
//!
//! - `cpu`: the CPU backend.
//! - `auto`: GPU 0 when this binary has CUDA support and the GPU opens; otherwise the CPU, with a
//!   warning to log when a GPU was expected but failed.
//! - `cuda:N` (`cuda` means `cuda:0`): GPU N or an error; an explicit request never falls back
//!   silently to a backend that is orders of magnitude slower.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// Whether this binary was built with the CUDA backend (cargo feature `cuda`).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The device asked for on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A GPU when one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// This GPU, by CUDA ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = || {
            Error::Setup(format!(
                "invalid device `{s}`: expected auto, cpu or cuda:N (N a GPU index)"
            ))
        };
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => {
                let index = other.strip_prefix("cuda:").ok_or_else(invalid)?;
                // Digits only: `usize::from_str` would also take a leading `+`.
                if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid());
                }
                index.parse().map(Self::Cuda).map_err(|_| invalid())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The outcome of [`select`]: the opened GPU (whatever `open_cuda` returns, e.g. a
/// `CudaBackend`) or the CPU, with a warning to log when the CPU is a fallback.
#[derive(Debug, PartialEq, Eq)]
pub enum Selected<G> {
    Cpu { warning: Option<String> },
    Cuda(G),
}

/// Applies the rules of this module. `cuda_built` is [`CUDA_BUILT`] (a parameter so that both
/// builds' rules are tested in either); `open_cuda(n)` opens GPU `n` and is called at most once,
/// never for `cpu` or in a build without CUDA.
pub fn select<G>(
    spec: DeviceSpec,
    cuda_built: bool,
    open_cuda: impl FnOnce(usize) -> std::result::Result<G, String>,
) -> Result<Selected<G>> {
    match spec {
        DeviceSpec::Cpu => Ok(Selected::Cpu { warning: None }),
        // A CPU-only build is a deliberate choice: nothing to warn about.
        DeviceSpec::Auto if !cuda_built => Ok(Selected::Cpu { warning: None }),
        DeviceSpec::Auto => match open_cuda(0) {
            Ok(gpu) => Ok(Selected::Cuda(gpu)),
            Err(reason) => Ok(Selected::Cpu {
                warning: Some(format!(
                    "--device auto: no usable GPU ({reason}); running on the CPU, which is much slower"
                )),
            }),
        },
        DeviceSpec::Cuda(n) if !cuda_built => Err(Error::Setup(format!(
            "--device cuda:{n}: this binary was built without CUDA support (cargo feature `cuda`); \
             use --device cpu or a CUDA build"
        ))),
        DeviceSpec::Cuda(n) => open_cuda(n)
            .map(Selected::Cuda)
            .map_err(|reason| Error::Setup(format!("--device cuda:{n}: cannot use the GPU: {reason}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_rejects_the_rest() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(" cuda:12 ".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(12));
        for bad in [
            "", "gpu", "CUDA:0", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "cuda:0:1", "cuda0", "cpu:0",
        ] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{bad}`")) && err.contains("auto, cpu or cuda:N"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for spec in [DeviceSpec::Auto, DeviceSpec::Cpu, DeviceSpec::Cuda(7)] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
    }

    /// An `open_cuda` that must not be called.
    fn never(n: usize) -> std::result::Result<usize, String> {
        panic!("tried to open GPU {n}")
    }

    #[test]
    fn cpu_never_touches_cuda() {
        for built in [false, true] {
            assert_eq!(
                select(DeviceSpec::Cpu, built, never).unwrap(),
                Selected::Cpu { warning: None }
            );
        }
    }

    #[test]
    fn auto_prefers_gpu_zero_and_falls_back_with_a_warning() {
        assert_eq!(
            select(DeviceSpec::Auto, true, Ok::<_, String>).unwrap(),
            Selected::Cuda(0)
        );
        let got = select(DeviceSpec::Auto, true, |_| {
            Err::<usize, _>("no NVIDIA driver".to_string())
        })
        .unwrap();
        let Selected::Cpu { warning: Some(w) } = got else {
            panic!("expected a CPU fallback with a warning, got {got:?}");
        };
        assert!(w.contains("no NVIDIA driver") && w.contains("CPU"), "{w}");
        // Without CUDA support, auto is the CPU, quietly, and no GPU is tried.
        assert_eq!(
            select(DeviceSpec::Auto, false, never).unwrap(),
            Selected::Cpu { warning: None }
        );
    }

    #[test]
    fn explicit_gpu_opens_that_gpu_or_fails() {
        assert_eq!(
            select(DeviceSpec::Cuda(2), true, Ok::<_, String>).unwrap(),
            Selected::Cuda(2)
        );
        let err = select(DeviceSpec::Cuda(1), true, |_| {
            Err::<usize, _>("out of GPU memory".into())
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cuda:1") && err.contains("out of GPU memory"),
            "{err}"
        );
        let err = select(DeviceSpec::Cuda(0), false, never).unwrap_err().to_string();
        assert!(err.contains("built without CUDA support"), "{err}");
    }
}
