//! Paged attention for decode on CUDA: Rust wrappers around the vendored vLLM kernels
//! (`crates/lmgen-core/cuda/`, built by `build.rs` with the `cuda` feature).
//!
//! Caches use vLLM's layout: keys `[num_blocks, kv_heads, head_dim / x, block_size, x]` with
//! `x = 16 / element size`, values `[num_blocks, kv_heads, head_dim, block_size]`. The kernels'
//! launchers silently skip head or block sizes they were not instantiated for, so every
//! shape, dtype and device is checked here and reported as an error.
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

/// Head sizes the kernels are instantiated for.
pub const HEAD_DIMS: [usize; 8] = [64, 80, 96, 112, 128, 192, 256, 512];
/// Block sizes the kernels are instantiated for.
pub const BLOCK_SIZES: [usize; 3] = [8, 16, 32];
/// Positions per partition of the v2 kernel.
const PARTITION: usize = 512;

/// Whether the kernels support this element type.
pub fn supported_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Elements per 16-byte vector: the innermost key dimension of the cache.
pub fn x_for(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

fn err(msg: impl Into<String>) -> Error {
    Error::PagedAttention(msg.into())
}

/// Checks the caches against each other; returns `(num_blocks, kv_heads, head_dim, block_size)`.
fn cache_dims(key_cache: &Tensor, value_cache: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let dtype = key_cache.dtype();
    if !supported_dtype(dtype) || value_cache.dtype() != dtype {
        return Err(err(format!(
            "caches must be f32, f16 or bf16 and of one dtype (keys {:?}, values {:?})",
            dtype,
            value_cache.dtype()
        )));
    }
    let (nb, nkv, hx, bs, x) = match key_cache.dims() {
        &[a, b, c, d, e] => (a, b, c, d, e),
        d => return Err(err(format!("key cache must have rank 5, got shape {d:?}"))),
    };
    if x != x_for(dtype) {
        return Err(err(format!(
            "key cache innermost dim {x}, expected {} for {dtype:?}",
            x_for(dtype)
        )));
    }
    let hd = hx * x;
    if value_cache.dims() != [nb, nkv, hd, bs] {
        return Err(err(format!(
            "value cache shape {:?}, expected {:?} for key cache {:?}",
            value_cache.dims(),
            [nb, nkv, hd, bs],
            key_cache.dims()
        )));
    }
    if !HEAD_DIMS.contains(&hd) {
        return Err(err(format!(
            "head dim {hd} not supported (one of {HEAD_DIMS:?})"
        )));
    }
    if !BLOCK_SIZES.contains(&bs) {
        return Err(err(format!(
            "block size {bs} not supported (one of {BLOCK_SIZES:?})"
        )));
    }
    if !key_cache.is_contiguous() || !value_cache.is_contiguous() {
        return Err(err("caches must be contiguous"));
    }
    if nkv.saturating_mul(hd).saturating_mul(bs) > i32::MAX as usize || nb > i32::MAX as usize {
        return Err(err("cache too large for the kernels' 32-bit strides"));
    }
    Ok((nb, nkv, hd, bs))
}

fn same_device(a: &Tensor, b: &Tensor, name: &str) -> Result<()> {
    if a.device().same_device(b.device()) {
        Ok(())
    } else {
        Err(err(format!("{name} is on another device")))
    }
}

fn as_i32(v: usize, name: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| err(format!("{name} = {v} does not fit the kernels' int")))
}

/// Writes keys and values `[num_tokens, kv_heads, head_dim]` (rows may be strided, heads and
/// dims contiguous) into the caches at `slots` (`[num_tokens]` i64, `block * block_size +
/// offset`; negative slots are skipped).
///
/// # Safety
///
/// Every slot must be negative or below `num_blocks * block_size` of the caches: the kernel
/// writes there without a bounds check (reading the slots back to check them would stall
/// the stream).
pub unsafe fn reshape_and_cache(
    key: &Tensor,
    value: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slots: &Tensor,
) -> Result<()> {
    let (_, nkv, hd, bs) = cache_dims(key_cache, value_cache)?;
    let dtype = key_cache.dtype();
    let (n, kh, kd) = key.dims3().map_err(|e| err(format!("keys: {e}")))?;
    if (kh, kd) != (nkv, hd) || value.dims() != key.dims() {
        return Err(err(format!(
            "keys {:?} / values {:?} do not match the cache ({nkv} heads of {hd})",
            key.dims(),
            value.dims()
        )));
    }
    if key.dtype() != dtype || value.dtype() != dtype {
        return Err(err(format!(
            "keys/values are {:?}, the cache is {dtype:?}",
            key.dtype()
        )));
    }
    if slots.dtype() != DType::I64 || slots.dims() != [n] {
        return Err(err(format!(
            "slots must be i64 [{n}], got {:?} {:?}",
            slots.dtype(),
            slots.dims()
        )));
    }
    let row_major = |t: &Tensor| {
        let s = t.stride();
        s[2] == 1 && s[1] == hd
    };
    if !row_major(key) || !row_major(value) || !slots.is_contiguous() {
        return Err(err(
            "keys/values need contiguous heads and dims, slots contiguous",
        ));
    }
    for (t, name) in [
        (value, "values"),
        (key_cache, "key cache"),
        (value_cache, "value cache"),
        (slots, "slots"),
    ] {
        same_device(key, t, name)?;
    }
    if n == 0 {
        return Ok(());
    }
    imp::reshape_and_cache(
        key,
        value,
        key_cache,
        value_cache,
        slots,
        CacheArgs {
            num_tokens: as_i32(n, "tokens")?,
            num_heads: as_i32(nkv, "kv heads")?,
            head_size: as_i32(hd, "head dim")?,
            block_size: as_i32(bs, "block size")?,
            x: as_i32(x_for(dtype), "x")?,
            key_stride: as_i32(key.stride()[0], "key stride")?,
            value_stride: as_i32(value.stride()[0], "value stride")?,
        },
    )
}

/// Decode attention: one query per sequence, `q` `[num_seqs, heads, head_dim]` (contiguous),
/// against the cached keys and values of each sequence's blocks. `block_tables`
/// `[num_seqs, max_blocks]` u32, `context_lens` `[num_seqs]` u32 (positions to attend to,
/// including the new one, whose keys must already be in the cache), `max_context_len` their
/// maximum. `softcap`: tanh cap of the scaled scores (`None`: no cap). Returns
/// `[num_seqs, heads, head_dim]` in `q`'s dtype.
///
/// # Safety
///
/// Every context length must be at most `max_context_len`, and the first
/// `ceil(context_len / block_size)` entries of each block-table row must be block ids below
/// the caches' `num_blocks`: the kernel reads there without a bounds check.
#[allow(clippy::too_many_arguments)]
pub unsafe fn paged_attention(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    max_context_len: usize,
    scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let (_, nkv, hd, bs) = cache_dims(key_cache, value_cache)?;
    let (ns, nh, qd) = q.dims3().map_err(|e| err(format!("query: {e}")))?;
    if qd != hd || nh == 0 || nh % nkv != 0 {
        return Err(err(format!(
            "query {:?} does not match the cache ({nkv} kv heads of {hd})",
            q.dims()
        )));
    }
    if q.dtype() != key_cache.dtype() {
        return Err(err(format!(
            "query is {:?}, the cache is {:?}",
            q.dtype(),
            key_cache.dtype()
        )));
    }
    if !q.is_contiguous() {
        return Err(err("query must be contiguous"));
    }
    let max_blocks = match block_tables.dims() {
        &[s, m] if s == ns && m > 0 => m,
        d => {
            return Err(err(format!(
                "block tables shape {d:?}, expected [{ns}, >0]"
            )))
        }
    };
    if block_tables.dtype() != DType::U32 || !block_tables.is_contiguous() {
        return Err(err("block tables must be contiguous u32"));
    }
    if context_lens.dtype() != DType::U32
        || context_lens.dims() != [ns]
        || !context_lens.is_contiguous()
    {
        return Err(err(format!(
            "context lengths must be contiguous u32 [{ns}], got {:?} {:?}",
            context_lens.dtype(),
            context_lens.dims()
        )));
    }
    if max_context_len == 0 || max_context_len > max_blocks * bs {
        return Err(err(format!(
            "max context length {max_context_len} outside 1..={} (block tables)",
            max_blocks * bs
        )));
    }
    for (t, name) in [
        (key_cache, "key cache"),
        (value_cache, "value cache"),
        (block_tables, "block tables"),
        (context_lens, "context lengths"),
    ] {
        same_device(q, t, name)?;
    }
    let out = Tensor::zeros((ns, nh, hd), q.dtype(), q.device())?;
    if ns == 0 {
        return Ok(out);
    }
    let parts = max_context_len.div_ceil(PARTITION);
    // v1 keeps all logits of a sequence in shared memory: one partition, or many sequences
    // (enough blocks to fill the GPU) with contexts short enough for the shared memory.
    let v1 = parts == 1 || (ns * nh > 512 && max_context_len <= 16 * 1024);
    let args = AttnArgs {
        num_kv_heads: as_i32(nkv, "kv heads")?,
        scale,
        softcap: softcap.unwrap_or(1.0),
        block_size: as_i32(bs, "block size")?,
        max_context_len: as_i32(max_context_len, "max context length")?,
        num_seqs: as_i32(ns, "sequences")?,
        num_heads: as_i32(nh, "heads")?,
        head_size: as_i32(hd, "head dim")?,
        max_blocks: as_i32(max_blocks, "blocks per sequence")?,
        q_stride: as_i32(nh * hd, "query stride")?,
        kv_block_stride: as_i32(nkv * hd * bs, "block stride")?,
        kv_head_stride: as_i32(hd * bs, "head stride")?,
    };
    let scratch = if v1 {
        None
    } else {
        let dev = q.device();
        Some((
            Tensor::zeros((ns, nh, parts), DType::F32, dev)?,
            Tensor::zeros((ns, nh, parts), DType::F32, dev)?,
            Tensor::zeros((ns, nh, parts, hd), q.dtype(), dev)?,
        ))
    };
    imp::paged_attention(
        &out,
        q,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        scratch.as_ref(),
        args,
    )?;
    Ok(out)
}

/// Arguments of the cache-write kernel, as the launcher takes them.
#[allow(dead_code)]
pub(crate) struct CacheArgs {
    pub num_tokens: i32,
    pub num_heads: i32,
    pub head_size: i32,
    pub block_size: i32,
    pub x: i32,
    pub key_stride: i32,
    pub value_stride: i32,
}

/// Arguments of the paged-attention kernels, as the launchers take them.
#[allow(dead_code)]
pub(crate) struct AttnArgs {
    pub num_kv_heads: i32,
    pub scale: f32,
    pub softcap: f32,
    pub block_size: i32,
    pub max_context_len: i32,
    pub num_seqs: i32,
    pub num_heads: i32,
    pub head_size: i32,
    pub max_blocks: i32,
    pub q_stride: i32,
    pub kv_block_stride: i32,
    pub kv_head_stride: i32,
}

#[cfg(not(feature = "cuda"))]
#[allow(dead_code)]
mod imp {
    use super::{err, Result};
    use candle_core::Tensor;

    use super::{AttnArgs, CacheArgs};

    pub fn reshape_and_cache(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: CacheArgs,
    ) -> Result<()> {
        Err(err("this build has no CUDA support"))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Option<&(Tensor, Tensor, Tensor)>,
        _: AttnArgs,
    ) -> Result<()> {
        Err(err("this build has no CUDA support"))
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{err, Result};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{sys::CUstream, DevicePtr};
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{DType, Storage, Tensor};
    use std::ffi::c_void;

    use super::{AttnArgs, CacheArgs};

    /// The launchers of the vLLM paged-attention kernels (as mistral.rs builds them).
    mod ffi {
        use candle_core::cuda_backend::cudarc::driver::sys::CUstream;
        use std::ffi::c_void;

        /// `$body!` on a launcher name list and the full parameter list of the paged-attention
        /// launchers, `extra` parameters after `out` (v2's scratch buffers).
        macro_rules! with_params {
            ($body:ident! $names:tt [$($extra:tt)*]) => {
                $body!($names (
                    out: *mut c_void,
                    $($extra)*
                    query: *const c_void,
                    key_cache: *const c_void,
                    value_cache: *const c_void,
                    alibi_slopes: *const c_void,
                    num_kv_heads: i32,
                    scale: f32,
                    softcapping: f32,
                    block_tables: *const u32,
                    context_lens: *const u32,
                    block_size: i32,
                    max_context_len: i32,
                    num_seqs: i32,
                    num_heads: i32,
                    head_size: i32,
                    max_num_blocks_per_seq: i32,
                    q_stride: i32,
                    kv_block_stride: i32,
                    kv_head_stride: i32,
                    stream: CUstream,
                    cache_dtype: u32,
                    k_scale: *const f32,
                    v_scale: *const f32,
                    sinks: *const f32,
                ));
            };
        }

        /// A function type and the per-dtype launchers of that signature.
        macro_rules! launchers {
            ([$ty:ident $($name:ident)+] $sig:tt) => {
                pub type $ty = unsafe extern "C" fn $sig;
                extern "C" {
                    $(pub fn $name $sig;)+
                }
            };
        }

        with_params!(launchers! [PagedV1
            paged_attention_v1_f32 paged_attention_v1_f16 paged_attention_v1_bf16] []);
        with_params!(launchers! [PagedV2
            paged_attention_v2_f32 paged_attention_v2_f16 paged_attention_v2_bf16] [
            exp_sums: *mut f32,
            max_logits: *mut f32,
            tmp_out: *mut c_void,
        ]);

        extern "C" {
            pub fn reshape_and_cache(
                key: *const c_void,
                value: *const c_void,
                key_cache: *mut c_void,
                value_cache: *mut c_void,
                slot_mapping: *const i64,
                num_tokens: i32,
                num_heads: i32,
                head_size: i32,
                block_size: i32,
                x: i32,
                key_stride: i32,
                value_stride: i32,
                stream: CUstream,
                dtype: u32,
                cache_dtype: u32,
                k_scale: *const f32,
                v_scale: *const f32,
            );
        }
    }

    /// Device address of `t`'s first element (its layout's start offset applied) and its
    /// CUDA device. The caller has checked the layout.
    fn dev_ptr(t: &Tensor, name: &str) -> Result<(u64, CudaDevice)> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(c) = &*storage else {
            return Err(err(format!("{name} is not on a CUDA device")));
        };
        let dev = c.device().clone();
        let stream = dev.cuda_stream();
        let elem = t.dtype().size_in_bytes() as u64;
        let base = match t.dtype() {
            DType::F32 => c.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
            DType::F16 => c.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
            DType::BF16 => c.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
            DType::U32 => c.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
            DType::I64 => c.as_cuda_slice::<i64>()?.device_ptr(&stream).0,
            d => return Err(err(format!("{name}: unsupported dtype {d:?}"))),
        };
        Ok((base + layout.start_offset() as u64 * elem, dev))
    }

    /// The kernels' dtype code: 0 f16, 1 bf16, 2 f32.
    fn code(dtype: DType) -> Result<u32> {
        match dtype {
            DType::F16 => Ok(0),
            DType::BF16 => Ok(1),
            DType::F32 => Ok(2),
            d => Err(err(format!("unsupported dtype {d:?}"))),
        }
    }

    /// The stream candle queues its work on, with its context bound to this thread (the
    /// kernels launch through the CUDA runtime, which uses the current context).
    fn stream(dev: &CudaDevice) -> Result<CUstream> {
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| err(format!("binding the CUDA context: {e}")))?;
        Ok(stream.cu_stream())
    }

    pub fn reshape_and_cache(
        key: &Tensor,
        value: &Tensor,
        key_cache: &Tensor,
        value_cache: &Tensor,
        slots: &Tensor,
        a: CacheArgs,
    ) -> Result<()> {
        let (k, dev) = dev_ptr(key, "keys")?;
        let (v, _) = dev_ptr(value, "values")?;
        let (kc, _) = dev_ptr(key_cache, "key cache")?;
        let (vc, _) = dev_ptr(value_cache, "value cache")?;
        let (sl, _) = dev_ptr(slots, "slots")?;
        let dtype = code(key_cache.dtype())?;
        let stream = stream(&dev)?;
        // SAFETY: the pointers address live device buffers of the tensors borrowed for this
        // call, whose shapes, strides and dtypes were checked against the arguments (every
        // index the kernel computes stays inside them; negative slots are skipped). The
        // launch is queued on candle's stream, so it is ordered with the work that produced
        // the inputs and with later reads of the caches, and the buffers outlive it (candle
        // frees device memory asynchronously on the same stream).
        unsafe {
            ffi::reshape_and_cache(
                k as *const c_void,
                v as *const c_void,
                kc as *mut c_void,
                vc as *mut c_void,
                sl as *const i64,
                a.num_tokens,
                a.num_heads,
                a.head_size,
                a.block_size,
                a.x,
                a.key_stride,
                a.value_stride,
                stream,
                dtype,
                dtype,
                std::ptr::null(),
                std::ptr::null(),
            );
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        out: &Tensor,
        q: &Tensor,
        key_cache: &Tensor,
        value_cache: &Tensor,
        block_tables: &Tensor,
        context_lens: &Tensor,
        scratch: Option<&(Tensor, Tensor, Tensor)>,
        a: AttnArgs,
    ) -> Result<()> {
        let (o, dev) = dev_ptr(out, "output")?;
        let (qp, _) = dev_ptr(q, "query")?;
        let (kc, _) = dev_ptr(key_cache, "key cache")?;
        let (vc, _) = dev_ptr(value_cache, "value cache")?;
        let (bt, _) = dev_ptr(block_tables, "block tables")?;
        let (cl, _) = dev_ptr(context_lens, "context lengths")?;
        let dtype = code(q.dtype())?;
        let stream = stream(&dev)?;
        match scratch {
            None => {
                let f: ffi::PagedV1 = match q.dtype() {
                    DType::F32 => ffi::paged_attention_v1_f32,
                    DType::F16 => ffi::paged_attention_v1_f16,
                    _ => ffi::paged_attention_v1_bf16,
                };
                // SAFETY: as in `reshape_and_cache`: live, checked buffers on candle's
                // stream. `out` is a fresh tensor nothing else reads before this kernel,
                // block tables hold ids below the cache's block count (written by
                // `GpuKvPool`), and no ALiBi, FP8 scales or sinks are passed (null).
                unsafe {
                    f(
                        o as *mut c_void,
                        qp as *const c_void,
                        kc as *const c_void,
                        vc as *const c_void,
                        std::ptr::null(),
                        a.num_kv_heads,
                        a.scale,
                        a.softcap,
                        bt as *const u32,
                        cl as *const u32,
                        a.block_size,
                        a.max_context_len,
                        a.num_seqs,
                        a.num_heads,
                        a.head_size,
                        a.max_blocks,
                        a.q_stride,
                        a.kv_block_stride,
                        a.kv_head_stride,
                        stream,
                        dtype,
                        std::ptr::null(),
                        std::ptr::null(),
                        std::ptr::null(),
                    );
                }
            }
            Some((exp_sums, max_logits, tmp_out)) => {
                let (es, _) = dev_ptr(exp_sums, "exp sums")?;
                let (ml, _) = dev_ptr(max_logits, "max logits")?;
                let (tmp, _) = dev_ptr(tmp_out, "partial outputs")?;
                let f: ffi::PagedV2 = match q.dtype() {
                    DType::F32 => ffi::paged_attention_v2_f32,
                    DType::F16 => ffi::paged_attention_v2_f16,
                    _ => ffi::paged_attention_v2_bf16,
                };
                // SAFETY: as for v1; the scratch tensors are fresh, sized
                // [seqs, heads, partitions(, head_dim)] for this call's maximum context.
                unsafe {
                    f(
                        o as *mut c_void,
                        es as *mut f32,
                        ml as *mut f32,
                        tmp as *mut c_void,
                        qp as *const c_void,
                        kc as *const c_void,
                        vc as *const c_void,
                        std::ptr::null(),
                        a.num_kv_heads,
                        a.scale,
                        a.softcap,
                        bt as *const u32,
                        cl as *const u32,
                        a.block_size,
                        a.max_context_len,
                        a.num_seqs,
                        a.num_heads,
                        a.head_size,
                        a.max_blocks,
                        a.q_stride,
                        a.kv_block_stride,
                        a.kv_head_stride,
                        stream,
                        dtype,
                        std::ptr::null(),
                        std::ptr::null(),
                        std::ptr::null(),
                    );
                }
            }
        }
        Ok(())
    }
}
