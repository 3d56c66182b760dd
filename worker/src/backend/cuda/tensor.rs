//! The CUDA backend's tensor, a device buffer and its shape, and [`DeviceBuffer`], the device
//! memory that goes back to the backend's buffer cache when dropped
//! ([`crate::backend::buffer_cache`]).

use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchArgs, PushKernelArg};

use crate::backend::buffer_cache::BufferCache;

/// The backend's idle device buffers, shared with every buffer that goes back to them.
pub(super) type SharedBufferCache = Arc<Mutex<Buffers>>;

/// The buffer cache and what a graph capture changes about it.
pub(super) struct Buffers {
    pub(super) cache: BufferCache<CudaSlice<u8>>,
    /// A graph capture is under way: buffers dropped now are held, not given back, since a
    /// recorded kernel may read them whenever the graph is replayed; the graph keeps them
    /// (`graph.rs`).
    pub(super) capturing: bool,
    pub(super) held_by_capture: Vec<CudaSlice<u8>>,
}

impl Buffers {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            cache: BufferCache::new(limit),
            capturing: false,
            held_by_capture: Vec::new(),
        }
    }
}

/// Device bytes, handed back to the cache they came from when dropped (in stream order: the
/// kernels queued before the drop that use the buffer run before any queued after it that
/// reuse it; during a graph capture to the capture instead), or freed when they belong to no
/// cache (buffers allocated inside a graph capture, which the graph owns). It dereferences to
/// the `CudaSlice` it holds, and passes to kernels as that slice does.
pub struct DeviceBuffer {
    slice: ManuallyDrop<CudaSlice<u8>>,
    home: Option<SharedBufferCache>,
}

impl DeviceBuffer {
    pub(super) fn new(slice: CudaSlice<u8>, home: Option<SharedBufferCache>) -> Self {
        Self {
            slice: ManuallyDrop::new(slice),
            home,
        }
    }
}

impl Deref for DeviceBuffer {
    type Target = CudaSlice<u8>;

    fn deref(&self) -> &CudaSlice<u8> {
        &self.slice
    }
}

impl DerefMut for DeviceBuffer {
    fn deref_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.slice
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: `slice` is taken once, here, and not touched again.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        match &self.home {
            Some(home) => {
                let size = slice.len();
                let mut buffers = home.lock().unwrap_or_else(PoisonError::into_inner);
                if buffers.capturing {
                    buffers.held_by_capture.push(slice);
                    return;
                }
                let evicted = buffers.cache.give_back(size, slice);
                // Freed (queued on the stream) outside the lock.
                drop(buffers);
                drop(evicted);
            }
            None => drop(slice),
        }
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("bytes", &self.slice.len())
            .field("cached", &self.home.is_some())
            .finish()
    }
}

// SAFETY: the argument pushed is the held slice, exactly as cudarc pushes a `&CudaSlice`; the
// reference keeps the buffer alive for the launch's lifetime `'a`.
unsafe impl<'a, 'b: 'a> PushKernelArg<&'b DeviceBuffer> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b DeviceBuffer) -> &mut Self {
        self.arg(&*arg.slice)
    }
}

// SAFETY: as above, for a buffer the kernel writes.
unsafe impl<'a, 'b: 'a> PushKernelArg<&'b mut DeviceBuffer> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b mut DeviceBuffer) -> &mut Self {
        self.arg(&mut *arg.slice)
    }
}

/// `len` values of `T` at the start of a [`DeviceBuffer`] (which may be longer): the small
/// arguments a step uploads (ids, positions, block tables, draws) and the fixed buffers decode
/// graphs stage them in. Uploads take their buffers from the buffer cache as tensors do, so a
/// decode step allocates nothing from the driver. Passes to kernels as a pointer to `T`.
pub struct DeviceArray<T> {
    buf: DeviceBuffer,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: DeviceRepr> DeviceArray<T> {
    /// `buf` read as `len` values of `T`; `None` when it is too short.
    pub(super) fn new(buf: DeviceBuffer, len: usize) -> Option<Self> {
        (buf.len() >= len.max(1) * size_of::<T>()).then_some(Self {
            buf,
            len,
            _elem: PhantomData,
        })
    }

    /// The same buffer read as `len` values of `T`; `None` when it is too short.
    pub(super) fn with_len(self, len: usize) -> Option<Self> {
        Self::new(self.buf, len)
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The bytes it lives in (for device addresses and raw copies).
    pub(super) fn bytes(&self) -> &CudaSlice<u8> {
        &self.buf
    }

    /// Its values as a typed view (for copies to the host).
    pub(super) fn view(&self) -> crate::backend::Result<CudaView<'_, T>> {
        // SAFETY: the buffer holds at least `len` values of `T` (checked in `new`), and every
        // value in it was written as a `T`.
        unsafe { self.buf.transmute::<T>(self.len) }.ok_or_else(|| {
            crate::backend::BackendError::Device(format!(
                "a device array of {} values is too short",
                self.len
            ))
        })
    }
}

impl<T> std::fmt::Debug for DeviceArray<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceArray").field("len", &self.len).finish()
    }
}

// SAFETY: as for `DeviceBuffer`: the buffer's device pointer, kept alive by the reference.
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b DeviceArray<T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b DeviceArray<T>) -> &mut Self {
        self.arg(&arg.buf)
    }
}

// SAFETY: as above, for an array the kernel writes.
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b mut DeviceArray<T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b mut DeviceArray<T>) -> &mut Self {
        self.arg(&mut arg.buf)
    }
}

/// A dense row-major tensor in device memory, its elements stored in the backend's precision
/// (the buffer is raw bytes; the kernels read it as their `elem_t`). The buffer holds at least
/// one element (CUDA allocations of zero bytes are refused) and may be a reused one larger than
/// the shape needs; only the first `numel` elements are meaningful.
#[derive(Debug)]
pub struct CudaTensor {
    pub(super) buf: DeviceBuffer,
    pub(super) shape: Vec<usize>,
}

impl CudaTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements the shape describes.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}
