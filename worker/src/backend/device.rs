//! Which device the worker computes on: the `--device auto|cpu|cuda:N` setting and the rules for
//! falling back from a GPU to the CPU. Pure: opening the GPU is passed in as a function, so the
//! rules are tested on every machine, with or without CUDA.
//!
//! - `cpu`: the CPU backend.
//! - `auto`: GPU 0 when this binary has CUDA support and the GPU opens; otherwise the CPU, with a
//!   warning to log when a GPU was expected but failed.
//! - `cuda:N` (`cuda` means `cuda:0`): GPU N or an error; an explicit request never falls back
//!   silently to a backend that is orders of magnitude slower.
//!
//! Also the `--precision fp32|fp16|bf16` setting: the storage type of a GPU backend's tensors
//! (the CPU backend computes in fp32 whatever is asked), and where compiled GPU kernels are
//! cached when `--kernel-cache-dir` is not given ([`default_kernel_cache_dir`]).

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
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

/// The storage precision of a backend's tensors (weights, activations, key/value pools).
/// Arithmetic is fp32 in every case: reduced precision halves memory and its traffic, and lets
/// matrix products run on tensor cores with fp32 accumulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// IEEE single precision.
    #[default]
    F32,
    /// IEEE half precision (5 exponent bits: range to 65504).
    F16,
    /// bfloat16 (fp32's range, 8 significant bits).
    Bf16,
}

impl Precision {
    /// Every precision, for tests and tables.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Bf16];

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// Stores `data` in this precision (little-endian bytes), rounding to nearest, ties to even.
    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() * self.bytes());
        match self {
            Self::F32 => data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => data
                .iter()
                .for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
            Self::Bf16 => data
                .iter()
                .for_each(|&v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
        }
        out
    }

    /// Widens little-endian elements of this precision to `f32` (exact).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Self::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Self::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Self::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// `data` rounded to this precision and widened back: what a tensor of this precision holds.
    pub fn round(self, data: &[f32]) -> Vec<f32> {
        self.decode(&self.encode(data))
    }
}

impl FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "fp32" => Ok(Self::F32),
            "fp16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::Setup(format!(
                "invalid precision `{other}`: expected fp32, fp16 or bf16"
            ))),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "fp32",
            Self::F16 => "fp16",
            Self::Bf16 => "bf16",
        })
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

/// The compiled-kernel cache folder by the XDG convention other GPU tools follow:
/// `$XDG_CACHE_HOME/atomic-worker/kernels`, else `$HOME/.cache/atomic-worker/kernels`; `None`
/// when neither is set to an absolute path (a relative one would depend on the working folder).
/// The values are parameters so the rule is tested without touching the environment.
pub fn default_kernel_cache_dir(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    absolute(xdg_cache_home)
        .or_else(|| absolute(home).map(|h| h.join(".cache")))
        .map(|base| base.join("atomic-worker").join("kernels"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_cache_defaults_to_the_xdg_cache_then_home() {
        let some = |s: &str| Some(OsString::from(s));
        assert_eq!(
            default_kernel_cache_dir(some("/var/cache"), some("/home/w")),
            Some(PathBuf::from("/var/cache/atomic-worker/kernels"))
        );
        assert_eq!(
            default_kernel_cache_dir(None, some("/home/w")),
            Some(PathBuf::from("/home/w/.cache/atomic-worker/kernels"))
        );
        // Relative or empty values are ignored, as the XDG specification says.
        assert_eq!(
            default_kernel_cache_dir(some("cache"), some("/home/w")),
            Some(PathBuf::from("/home/w/.cache/atomic-worker/kernels"))
        );
        assert_eq!(default_kernel_cache_dir(some(""), some("")), None);
        assert_eq!(default_kernel_cache_dir(None, None), None);
    }

    #[test]
    fn precisions_parse_print_and_round_to_nearest_even() {
        for p in Precision::ALL {
            assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
        }
        assert!(
            "half"
                .parse::<Precision>()
                .unwrap_err()
                .to_string()
                .contains("fp32, fp16 or bf16")
        );
        let values = [0.0, -1.5, 1.0 + 1.0 / 256.0, 3.0e38, 70000.0, f32::NAN, 1.0e-8];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&Precision::F32.round(&values)), bits(&values));
        // Expected values from PyTorch's .to(torch.bfloat16) / .to(torch.float16). 1 + 2^-8 is
        // exactly halfway between two bf16 values: ties go to the even one, 1.0.
        let bf = Precision::Bf16.round(&values);
        assert_eq!(&bf[..5], &[0.0, -1.5, 1.0, 3.004_055_3e38, 70144.0]);
        assert!(bf[5].is_nan());
        assert_eq!(bf[6], 1.001_171_8e-8);
        let h = Precision::F16.round(&values);
        assert_eq!(
            &h[..5],
            &[0.0, -1.5, 1.0 + 1.0 / 256.0, f32::INFINITY, f32::INFINITY]
        );
        assert!(h[5].is_nan());
        assert_eq!(h[6], 0.0, "below fp16's smallest subnormal");
        assert_eq!(Precision::F16.encode(&values).len(), 2 * values.len());
    }

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
