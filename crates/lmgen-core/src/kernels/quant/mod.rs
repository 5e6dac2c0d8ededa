//! Weight-only quantized linear layers for CPU inference: `y[m, n] = x[m, k] · W[n, k]ᵀ`
//! with `W` in one of ggml's block formats (GGUF tensor data is taken as is) and `x`, `y`
//! in f32, for any `m`.
//!
//! Each call quantizes the activation rows once to 8-bit blocks (32 values with an f32
//! scale for Q8_0/Q4_0/Q4_1; ggml's Q8_K 256-value blocks for Q4_K/Q6_K), then streams every
//! weight byte from memory once and dots it with all `m` activation rows in integer
//! arithmetic; tiles of `W` are split across rayon (small matmuls run on the calling
//! thread). The ISA is picked at run time: AVX-512 F/BW/VL+VNNI (`vpdpbusd`), else
//! AVX2+FMA+F16C (`maddubs`/`madd`), else a scalar path computing the same integer block
//! sums (`LMGEN_QUANT_ISA=avx2|scalar` caps the choice).
//!
//! Layout: the matrix is kept as 8-row tiles holding exactly ggml's bytes, regrouped when
//! it is built (rows padded to a multiple of 8): per tile and block, the 8 rows' scales
//! side by side, then the quants in 8-byte chunks, chunk-major, row within (details in
//! `formats.rs`). One vector load then covers 8 rows (AVX-512) or 4 rows (AVX2), one
//! broadcast of 8 activation bytes serves all of them, and the per-block scales are applied
//! as vectors. `to_ggml_bytes` gives ggml's layout back.
//!
//! MEASURED (this crate's `examples/quant_bench.rs`; 2-core VM, Xeon with AVX-512 VNNI,
//! shared with other builds, so ±20 %; best of 7, alternating; "cold" = rotating through
//! 1 GB of copies of each weight so every call streams from DRAM; speed-up vs the f32
//! streaming kernel `kernels::matmul_wt_small` on the same matrix; GF/s = 2·m·n·k / time):
//!
//! ```text
//! cold, 2 threads          m   f32 kernel   candle QMatMul      this module
//! 49152x576  Q8_0          1    7.82 ms      7.53 ms  x1.04     1.65 ms  x4.7 (18 GB/s)
//! 49152x576  Q8_0         16   23.1  ms     45.3  ms  x0.51     7.89 ms  x2.9 (115 GF/s)
//! 49152x576  Q4_1          1   10.1  ms     13.9  ms  x0.73     1.43 ms  x7.0
//! 49152x576  Q4_1         16   23.6  ms    202    ms  x0.12     6.55 ms  x3.6
//! 4096x4096  Q8_0          1    7.19 ms      2.47 ms  x2.9      1.30 ms  x5.5 (14 GB/s)
//! 4096x4096  Q8_0         16   24.4  ms      8.65 ms  x2.8      4.06 ms  x6.0 (132 GF/s)
//! 4096x4096  Q4_0          1    7.00 ms      4.68 ms  x1.5      0.75 ms  x9.3
//! 4096x4096  Q4_1          1    3.93 ms     10.4  ms  x0.38     0.92 ms  x4.3
//! 4096x4096  Q4_1         16    9.95 ms    116    ms  x0.09     2.63 ms  x3.8 (204 GF/s)
//! 4096x4096  Q4_K          1    5.10 ms      2.31 ms  x2.2      0.82 ms  x6.2 (11.5 GB/s)
//! 4096x4096  Q4_K         16   16.6  ms      5.12 ms  x3.2      2.78 ms  x6.0 (193 GF/s)
//! 4096x4096  Q6_K          1    5.08 ms      3.42 ms  x1.5      1.22 ms  x4.2
//! 4096x4096  Q6_K         16    9.31 ms      3.38 ms  x2.8      2.65 ms  x3.5 (203 GF/s)
//! hot (in L2), 1 thread
//! 1536x576   Q8_0          1    0.119 ms     0.080 ms (22 GF/s) 0.019 ms (93 GF/s)
//! 1536x576   Q8_0         16    0.459 ms     1.31  ms (22 GF/s) 0.163 ms (174 GF/s)
//! 1536x576   Q4_1         16    0.527 ms     8.54  ms (3.3)     0.160 ms (177 GF/s)
//! 576x1536   Q4_K          1    0.119 ms     0.018 ms (96 GF/s) 0.020 ms (87 GF/s)
//! 576x1536   Q4_K         16    0.722 ms     0.193 ms (147)     0.179 ms (159 GF/s)
//! 576x1536   Q6_K          1    0.119 ms     0.040 ms (44)      0.027 ms (66 GF/s)
//! 576x1536   Q6_K         16    0.546 ms     0.208 ms (136)     0.224 ms (126 GF/s)
//! prefill, hot, 2 threads  m   candle f32 matmul  candle QMatMul  this module
//! 4096x4096  Q8_0         64   27.7 ms            11.2 ms         9.8 ms
//! 4096x4096  Q8_0        256   86.6 ms            33.4 ms         35.4 ms
//! 4096x4096  Q4_K         64   27.0 ms             9.5 ms         10.4 ms
//! 4096x4096  Q4_K        256   87.0 ms            31.2 ms         40.8 ms
//! ```
//!
//! candle's generic x86 path (everything with `k % 256 != 0`, all Q4_0/Q4_1) runs one
//! scalar-scaled block at a time (~20 GF/s; Q4_1 has no SIMD at all, ~4 GF/s); its
//! repacked AVX-512 path (Q8_0/Q4_K/Q6_K with `k % 256 == 0`) is about as fast as the
//! tiles here when hot but keeps a second, larger copy of the weights (f32 scales, Q6_K
//! quants as bytes) next to the ggml one. Tried and dropped: dequantizing blocks of rows
//! and using candle's f32 GEMM for large `m` (4096x4096, m = 128: Q8_0 71 ms vs 22 ms
//! here; Q4_1 67 vs 26 ms), and the ggml row layout with one scalar scale per block and
//! row (AVX2, cold: Q8_0 ~6-8 GB/s, Q4_1 ~2.5-5 GB/s; hot m = 16: ~60 GF/s).
//!
//! Files: `formats.rs` (ggml blocks, tile layout), `act.rs` (activation quantization),
//! `scalar.rs` / `avx2.rs` / `avx512.rs` (tile kernels per ISA); this file holds the public
//! types, ISA selection and the matmul driver.
#![allow(clippy::needless_range_loop)] // index loops over rows / lanes read clearer in the kernels

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod formats;
mod scalar;
#[cfg(test)]
mod tests;

use super::matmul::OutPtr;
use act::QAct;
use formats::{dequantize_bytes, pack_tiles, quantize_bytes, unpack_row};
use rayon::prelude::*;
use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

const QK: usize = 32;
const QK_K: usize = 256;
/// Rows per tile.
const TILE: usize = 8;

/// A ggml block format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantKind {
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Q6K,
}

impl QuantKind {
    pub const ALL: [QuantKind; 5] = [
        QuantKind::Q8_0,
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q4K,
        QuantKind::Q6K,
    ];

    /// `"q8_0" | "q4_0" | "q4_1" | "q4_k" | "q6_k"` (case-insensitive, `q4k`/`q6k` also accepted).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "q8_0" => Some(Self::Q8_0),
            "q4_0" => Some(Self::Q4_0),
            "q4_1" => Some(Self::Q4_1),
            "q4_k" | "q4k" => Some(Self::Q4K),
            "q6_k" | "q6k" => Some(Self::Q6K),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q4K => "q4_k",
            Self::Q6K => "q6_k",
        }
    }

    /// Values per block (32 or 256).
    pub fn block_size(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 => QK,
            Self::Q4K | Self::Q6K => QK_K,
        }
    }

    /// Bytes per block in ggml's layout.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Bytes of one row of `cols` values (`cols` a multiple of the block size).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_size() * self.block_bytes()
    }

    /// The `ggml_type` id used in GGUF tensor infos.
    pub fn ggml_type(self) -> u32 {
        match self {
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q6K => 14,
        }
    }

    pub fn from_ggml_type(t: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.ggml_type() == t)
    }
}

impl FromStr for QuantKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| {
            format!("unknown quantization `{s}` (expected q8_0, q4_0, q4_1, q4_k or q6_k)")
        })
    }
}

impl fmt::Display for QuantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `[rows, cols]` weight matrix in a ggml block format (see the module docs for how the
/// blocks are arranged in memory).
#[derive(Clone)]
pub struct QMatrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QMatrix({}, {}x{})", self.kind, self.rows, self.cols)
    }
}

fn check_shape(kind: QuantKind, rows: usize, cols: usize) -> Result<(), String> {
    let bs = kind.block_size();
    if cols == 0 || !cols.is_multiple_of(bs) {
        return Err(format!(
            "{kind}: row length {cols} is not a multiple of the block size {bs}"
        ));
    }
    rows.checked_add(TILE)
        .and_then(|r| r.checked_mul(kind.row_bytes(cols)))
        .ok_or_else(|| format!("{kind}: {rows}x{cols} too large"))?;
    Ok(())
}

/// Rows as stored: padded to whole tiles.
fn stored_rows(rows: usize) -> usize {
    rows.div_ceil(TILE) * TILE
}

impl QMatrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix with ggml's reference quantizers (as
    /// ported by candle). Errors, so the caller keeps the layer in f32, when `cols` is not a
    /// multiple of the block size (32, or 256 for the K-quants).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, kind: QuantKind) -> Result<Self, String> {
        check_shape(kind, rows, cols)?;
        if w.len() != rows * cols {
            return Err(format!(
                "{kind}: {} values for a {rows}x{cols} matrix",
                w.len()
            ));
        }
        let rb = kind.row_bytes(cols);
        let mut data = vec![0u8; rows * rb];
        let per = (65536 / cols).max(1);
        data.par_chunks_mut(per * rb)
            .zip(w.par_chunks(per * cols))
            .for_each(|(dst, src)| quantize_bytes(kind, src, dst));
        Ok(Self {
            kind,
            rows,
            cols,
            data: pack_tiles(kind, rows, cols, &data),
        })
    }

    /// Takes raw ggml/GGUF tensor data (ggml's row-major blocks). GGUF lists dims innermost
    /// first, so a tensor with GGUF dims `[cols, rows]` is `rows` rows of `cols` values.
    pub fn from_ggml_bytes(
        kind: QuantKind,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, String> {
        check_shape(kind, rows, cols)?;
        let want = rows * kind.row_bytes(cols);
        if bytes.len() != want {
            return Err(format!(
                "{kind}: {} bytes for a {rows}x{cols} matrix, expected {want}",
                bytes.len()
            ));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            data: pack_tiles(kind, rows, cols, bytes),
        })
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes held (ggml's size, plus the zero rows padding the last tile).
    pub fn storage_bytes(&self) -> usize {
        self.data.len()
    }

    /// The matrix in ggml's row-major block layout (as in a GGUF file).
    pub fn to_ggml_bytes(&self) -> Vec<u8> {
        let rb = self.kind.row_bytes(self.cols);
        let mut out = vec![0u8; self.rows * rb];
        out.par_chunks_mut(rb)
            .enumerate()
            .for_each(|(r, o)| unpack_row(self.kind, &self.data, self.cols, r, o));
        out
    }

    /// Row `r` as f32 into `out` (`cols` values), the values of that row of
    /// [`Self::dequantize`]: a quantized embedding table gathered a token at a time.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.cols,
            "row {r} of {self:?}"
        );
        let rb = self.kind.row_bytes(self.cols);
        let mut stack = [0u8; 16384];
        let mut heap = Vec::new();
        let buf = if rb <= stack.len() {
            &mut stack[..rb]
        } else {
            heap.resize(rb, 0);
            &mut heap[..]
        };
        unpack_row(self.kind, &self.data, self.cols, r, buf);
        dequantize_bytes(self.kind, buf, out);
    }

    /// The row-major `[rows, cols]` f32 matrix.
    pub fn dequantize(&self) -> Vec<f32> {
        let (kind, cols) = (self.kind, self.cols);
        let mut out = vec![0f32; self.rows * cols];
        if cols == 0 {
            return out;
        }
        out.par_chunks_mut(cols).enumerate().for_each_init(
            || vec![0u8; kind.row_bytes(cols)],
            |buf, (r, orow)| {
                unpack_row(kind, &self.data, cols, r, buf);
                dequantize_bytes(kind, buf, orow);
            },
        );
        out
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ` (`x` row-major `[m, cols]`), any `m`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * self.rows];
        self.matmul_into(x, m, None, &mut y);
        y
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ + bias[rows]` (row-major; `out` is overwritten), any
    /// `m`. Same values as [`QMatrix::matmul`] followed by adding `bias` to every row.
    ///
    /// No heap allocation once the calling thread's activation buffers have grown to the
    /// largest `m × cols` seen (they are per thread and only grow; a call re-entered on the
    /// same thread while one is in flight uses fresh buffers).
    pub fn matmul_into(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        self.matmul_into_at(x, m, bias, out, level())
    }

    /// `matmul_into` at ISA level `lv`.
    fn matmul_into_at(
        &self,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        lv: Level,
    ) {
        let (n, k, kind) = (self.rows, self.cols, self.kind);
        assert_eq!(
            x.len(),
            m * k,
            "matmul: x has {} values, expected {m}x{k}",
            x.len()
        );
        assert_eq!(
            out.len(),
            m * n,
            "matmul: out has {} values, expected {m}x{n}",
            out.len()
        );
        if let Some(b) = bias {
            assert_eq!(
                b.len(),
                n,
                "matmul: bias has {} values, expected {n}",
                b.len()
            );
        }
        if m == 0 || n == 0 {
            return;
        }
        thread_local! {
            static ACT: RefCell<QAct> = const { RefCell::new(QAct::empty()) };
        }
        ACT.with(|cell| match cell.try_borrow_mut() {
            Ok(mut act) => {
                act.fill(kind, x, m, k, lv);
                self.run_tiles(&act, bias, out, lv);
            }
            // Re-entered on this thread (a rayon task run while this thread waits inside
            // `run_tiles`): the buffers are in use.
            Err(_) => self.run_tiles(&QAct::new(kind, x, m, k, lv), bias, out, lv),
        })
    }

    /// The product with quantized activations `act`: tasks take runs of whole tiles (=
    /// ranges of output columns); each tile's results go through a small stack buffer.
    fn run_tiles(&self, act: &QAct, bias: Option<&[f32]>, out: &mut [f32], lv: Level) {
        let (n, k, kind, m) = (self.rows, self.cols, self.kind, act.m);
        let rb = kind.row_bytes(k);
        let threads = crate::kernels::pool::threads();
        let tiles = stored_rows(n) / TILE;
        let per = (tiles / (threads * 8)).clamp(1, 128);
        let max_mt = max_mt(kind, lv);
        let data = &self.data;
        let y = OutPtr::new(out);
        let run = |task: usize| {
            let mut tmp = [0f32; TILE * MAX_MT];
            for ti in task * per..((task + 1) * per).min(tiles) {
                let tile = &data[ti * TILE * rb..(ti + 1) * TILE * rb];
                let c0 = ti * TILE;
                let cols = TILE.min(n - c0);
                let mut t = 0;
                while t < m {
                    let mt = (m - t).min(max_mt);
                    tile_kernel(kind, lv, tile, act, t, mt, &mut tmp, mt);
                    for tt in 0..mt {
                        let o = (t + tt) * n + c0;
                        for r in 0..cols {
                            let v = tmp[r * mt + tt];
                            let v = bias.map_or(v, |b| v + b[c0 + r]);
                            // SAFETY: t + tt < m and c0 + r < n: inside `out` ([m, n]);
                            // columns c0..c0 + 8 belong to this tile, which only this task runs.
                            unsafe { y.write(o + r, v) };
                        }
                    }
                    t += mt;
                }
            }
        };
        let tasks = tiles.div_ceil(per);
        if data.len() * m < SEQ_BYTES {
            // A few microseconds of work: handing it to the pool costs as much.
            (0..tasks).for_each(run);
        } else {
            crate::kernels::pool::for_each(tasks, run);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Instruction-set level, chosen once at run time.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F/BW/VL + VNNI (plus AVX2/FMA/F16C).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Levels this CPU can run, best last. `LMGEN_QUANT_ISA=scalar|avx2` caps the choice.
fn available_levels() -> Vec<Level> {
    #[allow(unused_mut)]
    let mut v = vec![Level::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            v.push(Level::Avx2);
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Level::Avx512);
            }
        }
    }
    v
}

fn level() -> Level {
    use std::sync::OnceLock;
    static LV: OnceLock<Level> = OnceLock::new();
    *LV.get_or_init(|| {
        let all = available_levels();
        let cap = std::env::var("LMGEN_QUANT_ISA").unwrap_or_default();
        let cap = match cap.as_str() {
            "scalar" => 0,
            "avx2" => 1,
            _ => usize::MAX,
        };
        all[cap.min(all.len() - 1)]
    })
}

/// Most activation rows any tile kernel takes per call.
const MAX_MT: usize = 8;

/// Activation rows per tile-kernel call (accumulators live in registers).
fn max_mt(kind: QuantKind, lv: Level) -> usize {
    match (kind, lv) {
        #[cfg(target_arch = "x86_64")]
        (QuantKind::Q4K | QuantKind::Q6K, Level::Avx512) => 4,
        #[cfg(target_arch = "x86_64")]
        (_, Level::Avx512) => 8,
        _ => 4,
    }
}

/// Below this many weight bytes × activation rows a matmul runs on the calling thread:
/// handing ~20 µs of work to the rayon pool cost as much as it saved (on the 2-core test
/// machine a 192x576 Q4_1 matmul took 8 µs through the pool, 3 µs inline; 576x576 13 vs
/// 6 µs).
const SEQ_BYTES: usize = 512 << 10;

/// Software prefetch distance in bytes of W. The row-at-a-time kernels this replaced did
/// so much work per cache line that out-of-order execution kept too few lines in flight
/// (prefetch took them from ~6 to ~12 GB/s); the tile kernels gain little from it, but it
/// costs one load-port slot per line.
#[cfg(target_arch = "x86_64")]
const PF_DIST: usize = 1024;

#[cfg(target_arch = "x86_64")]
fn pf_dist() -> usize {
    PF_DIST
}

// ---------------------------------------------------------------------------------------
// Kernel dispatch.
//
// `tile_kernel`: one 8-row tile (`nb` blocks) against activation rows `t0..t0 + mt`,
// writing `out[r * os + t]` for r in 0..8, t in 0..mt.

#[allow(clippy::too_many_arguments)]
fn tile_kernel(
    kind: QuantKind,
    lv: Level,
    tile: &[u8],
    act: &QAct,
    t0: usize,
    mt: usize,
    out: &mut [f32],
    os: usize,
) {
    let m = act.m;
    assert!(mt >= 1 && mt <= max_mt(kind, lv) && t0 + mt <= m && os >= mt);
    assert_eq!(tile.len(), TILE * kind.row_bytes(act.k));
    assert!(out.len() >= (TILE - 1) * os + mt);
    assert!(act.qs.len() >= m * act.k && act.d.len() >= m * act.nb);
    if kind.block_size() == QK {
        assert!(act.s.len() >= m * act.nb);
    }
    #[allow(unused_macros)] // only the x86 arms use it
    macro_rules! go {
        ($isa:ident, $f:ident, $($n:literal)+) => {
            match mt {
                $($n => $isa::$f::<$n>(tile.as_ptr(), act, t0, out, os),)+
                _ => unreachable!(),
            }
        };
    }
    match lv {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA/F16C are present (Level::Avx2); sizes asserted above.
        Level::Avx2 => unsafe {
            match kind {
                QuantKind::Q8_0 => go!(avx2, t_q8_0, 1 2 3 4),
                QuantKind::Q4_0 => go!(avx2, t_q4_0, 1 2 3 4),
                QuantKind::Q4_1 => go!(avx2, t_q4_1, 1 2 3 4),
                QuantKind::Q4K => {
                    assert!(act.bs32p.len() >= m * act.nb * 4);
                    go!(avx2, t_q4k, 1 2 3 4)
                }
                QuantKind::Q6K => {
                    assert!(act.bsums.len() >= m * act.nb * 16);
                    go!(avx2, t_q6k, 1 2 3 4)
                }
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C are present; sizes asserted above.
        Level::Avx512 => unsafe {
            match kind {
                QuantKind::Q8_0 => {
                    assert!(act.xu.len() >= m * act.k);
                    go!(avx512, t_q8_0, 1 2 3 4 5 6 7 8)
                }
                QuantKind::Q4_0 => go!(avx512, t_q4_0, 1 2 3 4 5 6 7 8),
                QuantKind::Q4_1 => go!(avx512, t_q4_1, 1 2 3 4 5 6 7 8),
                QuantKind::Q4K => {
                    assert!(act.bs32p.len() >= m * act.nb * 4);
                    go!(avx512, t_q4k, 1 2 3 4)
                }
                QuantKind::Q6K => {
                    assert!(act.bsums.len() >= m * act.nb * 16);
                    go!(avx512, t_q6k, 1 2 3 4)
                }
            }
        },
        Level::Scalar => {
            thread_local! {
                static ROW: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
            }
            ROW.with_borrow_mut(|row| {
                row.resize(kind.row_bytes(act.k), 0);
                for r in 0..TILE {
                    unpack_row(kind, tile, act.k, r, row);
                    for t in 0..mt {
                        out[r * os + t] = scalar::dot(kind, row, act, t0 + t);
                    }
                }
            })
        }
    }
}
