//! Kernel launches: the `launch!` macro every op uses, the launch shapes of the row-wise and
//! elementwise kernels, and the conversion of sizes to the kernels' 32-bit `int`.

use cudarc::driver::LaunchConfig;

use crate::backend::Result;
use crate::backend::shapes;

/// Launches kernel `$name` with `$cfg` and the given argument references (locals, so that they
/// outlive the launch call).
macro_rules! launch {
    ($self:expr, $name:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let f = $self.kernel($name)?;
        let mut builder = $self.stream.launch_builder(f);
        $( cudarc::driver::PushKernelArg::arg(&mut builder, $arg); )+
        // SAFETY: the arguments match the kernel's parameter list in order and type (pointers
        // as device buffers, `int` as i32, `float` as f32), and the shapes were checked on the
        // host so that every index the kernel computes is inside its buffer.
        unsafe { builder.launch($cfg) }
            .map(|_| ())
            .map_err(|e| $crate::backend::cuda::context::driver_err(concat!("launching ", $name), e))
    }};
}

/// Threads per block for the row kernels (norms, softmax, argmax) and elementwise kernels.
pub(super) const BLOCK: u32 = 256;

/// Grid-stride kernels need no more blocks than this to fill any current GPU.
pub(super) const MAX_BLOCKS: usize = 1 << 16;

pub(super) use launch;

/// A size as the kernels' `int`, or an error for tensors too large for 32-bit indexing.
pub(super) fn int(op: &'static str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| shapes::err(op, format!("size {n} exceeds the CUDA kernels' 32-bit limit")))
}

pub(super) fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn elementwise_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).min(MAX_BLOCKS) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}
