//! Opening compute devices. CUDA builds load the driver (`libcuda.so.1`) and the CUDA
//! libraries (cuBLAS, cuRAND, NVRTC) with dlopen on first use, so the same binary runs on
//! machines without them; [`cuda`] checks for them first and reports what is missing.
use candle_core::Device;

/// Why a CUDA device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CudaUnavailable {
    #[error("this build has no CUDA support")]
    NotBuilt,
    #[error("no usable NVIDIA driver (libcuda.so.1 not found)")]
    NoDriver,
    #[error("CUDA library {0} not found on the library path (LD_LIBRARY_PATH)")]
    NoLibrary(&'static str),
    #[error("cannot use CUDA device {ordinal}: {msg}")]
    Device { ordinal: usize, msg: String },
}

/// Opens CUDA device `ordinal`.
#[cfg(not(feature = "cuda"))]
pub fn cuda(_ordinal: usize) -> Result<Device, CudaUnavailable> {
    Err(CudaUnavailable::NotBuilt)
}

/// Opens CUDA device `ordinal`. A panic while opening it (cudarc panics on a missing library
/// or driver symbol) is returned as an error; the panic hook is silenced meanwhile.
#[cfg(feature = "cuda")]
pub fn cuda(ordinal: usize) -> Result<Device, CudaUnavailable> {
    // SAFETY: these only try to dlopen the libraries by name (and close them again).
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(CudaUnavailable::NoDriver);
        }
        // candle's CUDA device creates a cuBLAS handle and a cuRAND generator.
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(CudaUnavailable::NoLibrary("libcublas"));
        }
        if !cudarc::curand::sys::is_culib_present() {
            return Err(CudaUnavailable::NoLibrary("libcurand"));
        }
    }
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    std::panic::set_hook(hook);
    let msg = match opened {
        Ok(Ok(device)) => return Ok(device),
        Ok(Err(e)) => e.to_string(),
        Err(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic in the CUDA libraries".into()),
    };
    Err(CudaUnavailable::Device { ordinal, msg })
}
