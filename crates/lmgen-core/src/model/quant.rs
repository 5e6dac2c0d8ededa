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
//! side by side, then the quants in 8-byte chunks, chunk-major, row within (details at
//! `tile_header`). One vector load then covers 8 rows (AVX-512) or 4 rows (AVX2), one
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
#![allow(clippy::needless_range_loop)] // index loops over rows / lanes read clearer in the kernels

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ6K, BlockQ8_0, GgmlType,
};
use rayon::prelude::*;
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
            .for_each(|(dst, src)| match kind {
                QuantKind::Q8_0 => quantize_into::<BlockQ8_0>(src, dst),
                QuantKind::Q4_0 => quantize_into::<BlockQ4_0>(src, dst),
                QuantKind::Q4_1 => quantize_into::<BlockQ4_1>(src, dst),
                QuantKind::Q4K => quantize_into::<BlockQ4K>(src, dst),
                QuantKind::Q6K => quantize_into::<BlockQ6K>(src, dst),
            });
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
        self.matmul_at(x, m, level())
    }

    /// `matmul` at ISA level `lv`.
    fn matmul_at(&self, x: &[f32], m: usize, lv: Level) -> Vec<f32> {
        let (n, k, kind) = (self.rows, self.cols, self.kind);
        assert_eq!(
            x.len(),
            m * k,
            "matmul: x has {} values, expected {m}x{k}",
            x.len()
        );
        if m == 0 || n == 0 {
            return vec![0f32; m * n];
        }
        let act = QAct::new(kind, x, m, k, lv);
        let rb = kind.row_bytes(k);
        let threads = rayon::current_num_threads().max(1);
        let pr = stored_rows(n);
        let max_mt = max_mt(kind, lv);
        // yt is [stored rows, m]; each task takes a run of whole tiles.
        let tiles = pr / TILE;
        let per = (tiles / (threads * 8)).clamp(1, 128);
        let mut yt = vec![0f32; pr * m];
        let data = &self.data;
        let run = |ti: usize, out: &mut [f32]| {
            let r0 = ti * per * TILE;
            for j in 0..out.len() / (TILE * m) {
                let tile = &data[(r0 + j * TILE) * rb..(r0 + (j + 1) * TILE) * rb];
                let o = &mut out[j * TILE * m..(j + 1) * TILE * m];
                let mut t = 0;
                while t < m {
                    let mt = (m - t).min(max_mt);
                    tile_kernel(kind, lv, tile, &act, t, mt, o, m);
                    t += mt;
                }
            }
        };
        let seq = data.len() * m < SEQ_BYTES;
        if seq {
            // A few microseconds of work: handing it to the pool costs as much.
            yt.chunks_mut(per * TILE * m)
                .enumerate()
                .for_each(|(ti, out)| run(ti, out));
        } else {
            yt.par_chunks_mut(per * TILE * m)
                .enumerate()
                .for_each(|(ti, out)| run(ti, out));
        }
        if m == 1 {
            yt.truncate(n);
            return yt;
        }
        // [rows, m] -> [m, rows], 16 output rows per task (contiguous reads of yt)
        let mut y = vec![0f32; m * n];
        let transpose = |(ci, yc): (usize, &mut [f32])| {
            let (i0, rows) = (ci * 16, yc.len() / n);
            for j in 0..n {
                for (ii, v) in yt[j * m + i0..j * m + i0 + rows].iter().enumerate() {
                    yc[ii * n + j] = *v;
                }
            }
        };
        if seq {
            y.chunks_mut(16 * n).enumerate().for_each(transpose);
        } else {
            y.par_chunks_mut(16 * n).enumerate().for_each(transpose);
        }
        y
    }
}

fn quantize_into<B: GgmlType>(src: &[f32], dst: &mut [u8]) {
    let n = src.len() / B::BLCK_SIZE;
    let mut blocks = vec![B::zeros(); n];
    B::from_float(src, &mut blocks);
    assert_eq!(dst.len(), n * std::mem::size_of::<B>());
    // SAFETY: ggml blocks are `repr(C)` plain data (f16 / integer fields, no padding: candle
    // asserts their sizes); `dst` has exactly their byte length.
    unsafe {
        std::ptr::copy_nonoverlapping(blocks.as_ptr() as *const u8, dst.as_mut_ptr(), dst.len())
    };
}

fn dequantize_with<B: GgmlType>(src: &[u8], dst: &mut [f32]) {
    let n = src.len() / std::mem::size_of::<B>();
    let mut blocks = vec![B::zeros(); n];
    // SAFETY: every bit pattern is a valid block (plain f16 / integer fields); the copy fills
    // exactly `n` blocks, and `blocks` is properly aligned.
    unsafe {
        std::ptr::copy_nonoverlapping(
            src.as_ptr(),
            blocks.as_mut_ptr() as *mut u8,
            n * std::mem::size_of::<B>(),
        )
    };
    B::to_float(&blocks, dst);
}

/// Dequantizes ggml-layout blocks.
fn dequantize_bytes(kind: QuantKind, src: &[u8], dst: &mut [f32]) {
    match kind {
        QuantKind::Q8_0 => dequantize_with::<BlockQ8_0>(src, dst),
        QuantKind::Q4_0 => dequantize_with::<BlockQ4_0>(src, dst),
        QuantKind::Q4_1 => dequantize_with::<BlockQ4_1>(src, dst),
        QuantKind::Q4K => dequantize_with::<BlockQ4K>(src, dst),
        QuantKind::Q6K => dequantize_with::<BlockQ6K>(src, dst),
    }
}

// ---------------------------------------------------------------------------------------
// 8-row tiles: per tile and block, `TILE × block_bytes` bytes
// holding the same information as the 8 rows' ggml blocks:
//
// * Q8_0/Q4_0/Q4_1: the 8 rows' f16 `d` (16 bytes), for Q4_1 the 8 f16 `m` (16 bytes), then
//   the quants: 8-byte chunk `c` of row `r` at `hdr + 64 c + 8 r` (Q8_0: 4 chunks of 8 i8;
//   Q4_0/Q4_1: 2 chunks of 8 nibble-pair bytes in ggml's order: the low nibble of byte j is
//   value j, the high nibble value j + 16).
// * Q4_K: `d` (16 bytes), `dmin` (16), the 6-bit sub-block scales with the top 2 bits of
//   the mins, `sc | (mn >> 4) << 6` at `32 + 8 j + r` (64), the low 4 bits of the mins at
//   `96 + 8 (j / 2) + r`, nibble `j % 2` (32), then ggml's 128 quant bytes per row as 16
//   chunks of 8 (`128 + 64 c + 8 r`; chunk c = bytes 8c..8c+8 of the row: low nibbles are
//   values 64 (c / 4) + 8 (c % 4) + 0..8, high nibbles the same + 32).
// * Q6_K: `d` (16 bytes), the 16 i8 scales as pairs `sc_2p, sc_2p+1` at `16 + 16 p + 2 r`
//   (128), then ggml's `ql` (16 chunks of 8 at `144 + 64 c + 8 r`) and `qh` (8 chunks at
//   `1168 + 64 c + 8 r`).

/// Header bytes of a tile block (before the quant chunks).
fn tile_header(kind: QuantKind) -> usize {
    match kind {
        QuantKind::Q8_0 | QuantKind::Q4_0 => 16,
        QuantKind::Q4_1 => 32,
        QuantKind::Q4K => 128,
        QuantKind::Q6K => 144,
    }
}

/// Row `r`'s ggml block `src` into tile block `dst`.
fn pack_block(kind: QuantKind, src: &[u8], dst: &mut [u8], r: usize) {
    if kind == QuantKind::Q6K {
        dst[2 * r..2 * r + 2].copy_from_slice(&src[208..210]);
        for g in 0..16 {
            dst[16 + 16 * (g / 2) + 2 * r + g % 2] = src[192 + g];
        }
        for c in 0..24 {
            // ql then qh: 24 chunks of 8, the qh ones right after the ql ones
            let o = 144 + 64 * c + 8 * r;
            dst[o..o + 8].copy_from_slice(&src[8 * c..8 * c + 8]);
        }
        return;
    }
    let hdr = tile_header(kind);
    let bb = kind.block_bytes();
    dst[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
    let qoff = match kind {
        QuantKind::Q4_1 => {
            dst[16 + 2 * r..18 + 2 * r].copy_from_slice(&src[2..4]);
            4
        }
        QuantKind::Q4K => {
            dst[16 + 2 * r..18 + 2 * r].copy_from_slice(&src[2..4]);
            for j in 0..8 {
                let (sc, mn) = scale_min_k4(j, &src[4..16]);
                dst[32 + 8 * j + r] = sc | ((mn >> 4) << 6);
                dst[96 + 8 * (j / 2) + r] |= (mn & 15) << (4 * (j % 2));
            }
            16
        }
        _ => 2,
    };
    for c in 0..(bb - qoff) / 8 {
        let o = hdr + 64 * c + 8 * r;
        dst[o..o + 8].copy_from_slice(&src[qoff + 8 * c..qoff + 8 * c + 8]);
    }
}

/// Row `r` of tile block `src` back into ggml block `dst`.
fn unpack_block(kind: QuantKind, src: &[u8], r: usize, dst: &mut [u8]) {
    if kind == QuantKind::Q6K {
        dst[208..210].copy_from_slice(&src[2 * r..2 * r + 2]);
        for g in 0..16 {
            dst[192 + g] = src[16 + 16 * (g / 2) + 2 * r + g % 2];
        }
        for c in 0..24 {
            let i = 144 + 64 * c + 8 * r;
            dst[8 * c..8 * c + 8].copy_from_slice(&src[i..i + 8]);
        }
        return;
    }
    let hdr = tile_header(kind);
    let bb = kind.block_bytes();
    dst[..2].copy_from_slice(&src[2 * r..2 * r + 2]);
    let qoff = match kind {
        QuantKind::Q4_1 => {
            dst[2..4].copy_from_slice(&src[16 + 2 * r..18 + 2 * r]);
            4
        }
        QuantKind::Q4K => {
            dst[2..4].copy_from_slice(&src[16 + 2 * r..18 + 2 * r]);
            let mut sc = [0u8; 8];
            let mut mn = [0u8; 8];
            for j in 0..8 {
                let v = src[32 + 8 * j + r];
                sc[j] = v & 63;
                mn[j] = ((v >> 6) << 4) | ((src[96 + 8 * (j / 2) + r] >> (4 * (j % 2))) & 15);
            }
            // inverse of ggml's get_scale_min_k4
            let q = &mut dst[4..16];
            for j in 0..4 {
                q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
                q[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
                q[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
            }
            16
        }
        _ => 2,
    };
    for c in 0..(bb - qoff) / 8 {
        let i = hdr + 64 * c + 8 * r;
        dst[qoff + 8 * c..qoff + 8 * c + 8].copy_from_slice(&src[i..i + 8]);
    }
}

fn pack_tiles(kind: QuantKind, rows: usize, cols: usize, ggml: &[u8]) -> Vec<u8> {
    let (bb, nb, rb) = (
        kind.block_bytes(),
        cols / kind.block_size(),
        kind.row_bytes(cols),
    );
    let mut out = vec![0u8; stored_rows(rows) * rb];
    out.par_chunks_mut(TILE * rb)
        .enumerate()
        .for_each(|(tile, dst)| {
            for r in 0..TILE.min(rows - tile * TILE) {
                let row = &ggml[(tile * TILE + r) * rb..(tile * TILE + r + 1) * rb];
                for b in 0..nb {
                    let d = &mut dst[b * TILE * bb..(b + 1) * TILE * bb];
                    pack_block(kind, &row[b * bb..(b + 1) * bb], d, r);
                }
            }
        });
    out
}

/// Row `row` of a tiled matrix in ggml's layout.
fn unpack_row(kind: QuantKind, data: &[u8], cols: usize, row: usize, out: &mut [u8]) {
    let (bb, nb, rb) = (
        kind.block_bytes(),
        cols / kind.block_size(),
        kind.row_bytes(cols),
    );
    let (tile, r) = (row / TILE, row % TILE);
    let t = &data[tile * TILE * rb..(tile + 1) * TILE * rb];
    for b in 0..nb {
        let s = &t[b * TILE * bb..(b + 1) * TILE * bb];
        unpack_block(kind, s, r, &mut out[b * bb..(b + 1) * bb]);
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

// ---------------------------------------------------------------------------------------
// Activation quantization.

/// Activation rows quantized to 8 bits: 32-value blocks with an f32 scale (`s` = scale ×
/// sum of the block's quants, for the Q4_0 offset and the Q4_1 minimum; `xu` = quants + 128
/// as u8, for the AVX-512 Q8_0 kernel), or ggml's Q8_K 256-value blocks (`bsums` = sums of
/// each 16 quants).
struct QAct {
    k: usize,
    nb: usize,
    qs: Vec<i8>,
    xu: Vec<u8>,
    d: Vec<f32>,
    s: Vec<f32>,
    bsums: Vec<i16>,
    /// Q4_K: per 256-block four i32, each the sums of two 32-value sub-blocks as an i16 pair.
    bs32p: Vec<i32>,
}

impl QAct {
    fn new(kind: QuantKind, x: &[f32], m: usize, k: usize, lv: Level) -> Self {
        let bs = kind.block_size();
        let nb = k / bs;
        let big = bs == QK_K;
        let mut a = QAct {
            k,
            nb,
            qs: vec![0i8; m * k],
            xu: Vec::new(),
            d: vec![0f32; m * nb],
            s: vec![0f32; if big { m } else { m * nb }],
            bsums: vec![0i16; if big { m * nb * 16 } else { m }],
            bs32p: Vec::new(),
        };
        let (sl, bl) = if big { (1, nb * 16) } else { (nb, 1) };
        let row = |i: usize, q: &mut [i8], d: &mut [f32], s: &mut [f32], b: &mut [i16]| {
            let xr = &x[i * k..(i + 1) * k];
            if big {
                quant_row_k(xr, q, d, b, lv)
            } else {
                quant_row_32(xr, q, d, s, lv)
            }
        };
        if m * k < 32768 {
            let chunks =
                a.qs.chunks_mut(k)
                    .zip(a.d.chunks_mut(nb))
                    .zip(a.s.chunks_mut(sl))
                    .zip(a.bsums.chunks_mut(bl));
            for (i, (((q, d), s), b)) in chunks.enumerate() {
                row(i, q, d, s, b);
            }
        } else {
            a.qs.par_chunks_mut(k)
                .zip(a.d.par_chunks_mut(nb))
                .zip(a.s.par_chunks_mut(sl))
                .zip(a.bsums.par_chunks_mut(bl))
                .enumerate()
                .for_each(|(i, (((q, d), s), b))| row(i, q, d, s, b));
        }
        if big {
            a.s.clear();
        } else {
            a.bsums.clear();
        }
        if kind == QuantKind::Q4K {
            a.bs32p = a
                .bsums
                .chunks_exact(4)
                .map(|b| {
                    let lo = (b[0] as i32 + b[1] as i32) as u16 as u32;
                    let hi = (b[2] as i32 + b[3] as i32) as u16 as u32;
                    (lo | (hi << 16)) as i32
                })
                .collect();
        }
        #[cfg(target_arch = "x86_64")]
        if kind == QuantKind::Q8_0 && lv == Level::Avx512 {
            a.xu = a.qs.iter().map(|&q| (q as u8) ^ 0x80).collect();
        }
        a
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

/// Symmetric 8-bit blocks of 32: `d = amax / 127`, `q = round_ties_even(x / d)`.
#[inline(always)]
fn quant_row_32_generic(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (b, ((xb, qb), (db, sb))) in x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(QK))
        .zip(d.iter_mut().zip(s.iter_mut()))
        .enumerate()
    {
        let _ = b;
        // max |x| through the bit patterns (integer max vectorizes; NaN-free input assumed)
        let mut amax_bits = 0u32;
        for &v in xb {
            amax_bits = amax_bits.max(v.to_bits() & 0x7fff_ffff);
        }
        let amax = f32::from_bits(amax_bits);
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
            *q = r as i8;
            sum += r;
        }
        *db = dd;
        *sb = dd * sum as f32;
    }
}

/// ggml's Q8_K: per 256 values `d = max / -128` (max = the value of largest magnitude),
/// `q = min(127, round(x / d))`, plus the sum of each 16 quants.
#[inline(always)]
fn quant_row_k_generic(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    for ((xb, qb), (db, bb)) in x
        .chunks_exact(QK_K)
        .zip(qs.chunks_exact_mut(QK_K))
        .zip(d.iter_mut().zip(bsums.chunks_exact_mut(16)))
    {
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *db = 0.0;
            qb.iter_mut().for_each(|q| *q = 0);
            bb.iter_mut().for_each(|b| *b = 0);
            continue;
        }
        let iscale = -128.0 / max;
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (iscale * v).round_ties_even().clamp(-128.0, 127.0) as i32 as i8;
        }
        for (j, b) in bb.iter_mut().enumerate() {
            *b = qb[16 * j..16 * j + 16].iter().map(|&q| q as i16).sum();
        }
        *db = 1.0 / iscale;
    }
}

fn quant_row_32(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], lv: Level) {
    match lv {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both levels are only chosen when the CPU has AVX2, FMA and F16C.
        Level::Avx2 | Level::Avx512 => unsafe { avx2::quant_row_32(x, qs, d, s) },
        Level::Scalar => quant_row_32_generic(x, qs, d, s),
    }
}

fn quant_row_k(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16], lv: Level) {
    match lv {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 | Level::Avx512 => unsafe { avx2::quant_row_k(x, qs, d, bsums) },
        Level::Scalar => quant_row_k_generic(x, qs, d, bsums),
    }
}

// ---------------------------------------------------------------------------------------
// Kernel dispatch.
//
// `tile_kernel`: one 8-row tile (`nb` blocks) against activation rows `t0..t0 + mt`,
// writing `out[r * m + t0 + t]` for r in 0..8.

#[allow(clippy::too_many_arguments)]
fn tile_kernel(
    kind: QuantKind,
    lv: Level,
    tile: &[u8],
    act: &QAct,
    t0: usize,
    mt: usize,
    out: &mut [f32],
    m: usize,
) {
    assert!(mt >= 1 && mt <= max_mt(kind, lv) && t0 + mt <= m);
    assert_eq!(tile.len(), TILE * kind.row_bytes(act.k));
    assert!(out.len() >= TILE * m);
    assert!(act.qs.len() >= m * act.k && act.d.len() >= m * act.nb);
    if kind.block_size() == QK {
        assert!(act.s.len() >= m * act.nb);
    }
    #[allow(unused_macros)] // only the x86 arms use it
    macro_rules! go {
        ($isa:ident, $f:ident, $($n:literal)+) => {
            match mt {
                $($n => $isa::$f::<$n>(tile.as_ptr(), act, t0, out, m),)+
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
            let rb = kind.row_bytes(act.k);
            let mut row = vec![0u8; rb];
            for r in 0..TILE {
                unpack_row(kind, tile, act.k, r, &mut row);
                for t in t0..t0 + mt {
                    out[r * m + t] = scalar::dot(kind, &row, act, t);
                }
            }
        }
    }
}

#[inline(always)]
fn f16_at(p: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([p[off], p[off + 1]])).to_f32()
}

/// ggml's 6-bit scale/min unpacking for Q4_K.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Portable kernels computing the same integer block sums as the SIMD ones.
mod scalar {
    use super::*;

    pub(super) fn dot(kind: QuantKind, w: &[u8], a: &QAct, t: usize) -> f32 {
        let (k, nb) = (a.k, a.nb);
        let xq = &a.qs[t * k..(t + 1) * k];
        let xd = &a.d[t * nb..(t + 1) * nb];
        let mut acc = 0f32;
        match kind {
            QuantKind::Q8_0 => {
                for b in 0..nb {
                    let blk = &w[b * 34..(b + 1) * 34];
                    let s: i32 = (0..QK)
                        .map(|l| blk[2 + l] as i8 as i32 * xq[b * QK + l] as i32)
                        .sum();
                    acc += f16_at(blk, 0) * xd[b] * s as f32;
                }
            }
            QuantKind::Q4_0 | QuantKind::Q4_1 => {
                let (bb, off) = if kind == QuantKind::Q4_0 {
                    (18, 2)
                } else {
                    (20, 4)
                };
                let xs = &a.s[t * nb..(t + 1) * nb];
                let mut corr = 0f32;
                for b in 0..nb {
                    let blk = &w[b * bb..(b + 1) * bb];
                    let x = &xq[b * QK..(b + 1) * QK];
                    let mut s = 0i32;
                    for l in 0..16 {
                        let q = blk[off + l];
                        s += (q & 0xF) as i32 * x[l] as i32 + (q >> 4) as i32 * x[l + 16] as i32;
                    }
                    let dw = f16_at(blk, 0);
                    acc += dw * xd[b] * s as f32;
                    corr += if kind == QuantKind::Q4_0 {
                        -8.0 * dw
                    } else {
                        f16_at(blk, 2)
                    } * xs[b];
                }
                acc += corr;
            }
            QuantKind::Q4K => {
                let bs = &a.bsums[t * nb * 16..(t + 1) * nb * 16];
                for b in 0..nb {
                    let blk = &w[b * 144..(b + 1) * 144];
                    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                    let sc = &blk[4..16];
                    let qs = &blk[16..144];
                    let x = &xq[b * QK_K..(b + 1) * QK_K];
                    let (mut sumi, mut summ) = (0i32, 0i32);
                    for j in 0..8 {
                        let (s, mn) = scale_min_k4(j, sc);
                        let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                        let xs = &x[32 * j..32 * j + 32];
                        let mut p = 0i32;
                        for l in 0..32 {
                            let v = if j % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 };
                            p += v as i32 * xs[l] as i32;
                        }
                        sumi += s as i32 * p;
                        summ +=
                            mn as i32 * (bs[b * 16 + 2 * j] as i32 + bs[b * 16 + 2 * j + 1] as i32);
                    }
                    acc += d * xd[b] * sumi as f32 - dmin * xd[b] * summ as f32;
                }
            }
            QuantKind::Q6K => {
                for b in 0..nb {
                    let blk = &w[b * 210..(b + 1) * 210];
                    let (ql, qh) = (&blk[0..128], &blk[128..192]);
                    let sc = &blk[192..208];
                    let d = f16_at(blk, 208);
                    let x = &xq[b * QK_K..(b + 1) * QK_K];
                    let mut sumi = 0i32;
                    for h in 0..2 {
                        let mut g = [0i32; 8];
                        for l in 0..32 {
                            let (a0, a1, hh) =
                                (ql[64 * h + l], ql[64 * h + l + 32], qh[32 * h + l]);
                            let q = [
                                (a0 & 0xF) | ((hh & 3) << 4),
                                (a1 & 0xF) | (((hh >> 2) & 3) << 4),
                                (a0 >> 4) | (((hh >> 4) & 3) << 4),
                                (a1 >> 4) | (((hh >> 6) & 3) << 4),
                            ];
                            for (i, &qi) in q.iter().enumerate() {
                                g[2 * i + l / 16] +=
                                    (qi as i32 - 32) * x[128 * h + 32 * i + l] as i32;
                            }
                        }
                        for (i, gi) in g.iter().enumerate() {
                            sumi += sc[8 * h + i] as i8 as i32 * gi;
                        }
                    }
                    acc += d * xd[b] * sumi as f32;
                }
            }
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quant_row_32(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
        quant_row_32_generic(x, qs, d, s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quant_row_k(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
        quant_row_k_generic(x, qs, d, bsums)
    }

    /// Prefetches `len` bytes starting at `p`, one touch per cache line.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn prefetch_range(p: *const u8, len: usize) {
        let mut o = 0;
        while o < len {
            _mm_prefetch::<_MM_HINT_T0>(p.add(o) as *const i8);
            o += 64;
        }
    }

    /// 8 bytes of activation quants broadcast to every 64-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bcast8(p: *const i8) -> __m256i {
        _mm256_set1_epi64x((p as *const i64).read_unaligned())
    }

    /// Lanes hold (row, half) pairs: `out[(4 h + i) * m + t] = v[2 i] + v[2 i + 1]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store_pairs(v: __m256, out: &mut [f32], h: usize, m: usize, t: usize) {
        let mut tmp = [0f32; 8];
        _mm256_storeu_ps(tmp.as_mut_ptr(), v);
        for i in 0..4 {
            out[(4 * h + i) * m + t] = tmp[2 * i] + tmp[2 * i + 1];
        }
    }

    /// Q8_0 tile × Q8 activations. A 32-byte load is 4 rows × 8 quants; `maddubs` gets
    /// |w| (u8) and the activations with w's sign (i8).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn t_q8_0<const MT: usize>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        const BB: usize = TILE * 34;
        let (k, nb) = (a.k, a.nb);
        let ones = _mm256_set1_epi16(1);
        let idx = [
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
            _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
        ];
        let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let pf = if t0 == 0 { pf_dist() } else { 0 };
        let mut acc = [[_mm256_setzero_ps(); 2]; MT];
        for b in 0..nb {
            let blk = tile.add(b * BB);
            if pf != 0 {
                prefetch_range(blk.add(pf), BB);
            }
            let d8 = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            for h in 0..2 {
                let dexp = _mm256_permutevar8x32_ps(d8, idx[h]);
                let mut isum = [_mm256_setzero_si256(); MT];
                for c in 0..4 {
                    let w = _mm256_loadu_si256(blk.add(16 + 64 * c + 32 * h) as *const __m256i);
                    let aw = _mm256_sign_epi8(w, w);
                    for t in 0..MT {
                        let sx = _mm256_sign_epi8(bcast8(xq[t].add(b * QK + 8 * c)), w);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                        isum[t] = _mm256_add_epi32(isum[t], p);
                    }
                }
                for t in 0..MT {
                    let s = _mm256_mul_ps(dexp, _mm256_set1_ps(*xd[t].add(b)));
                    acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), s, acc[t][h]);
                }
            }
        }
        for t in 0..MT {
            for h in 0..2 {
                store_pairs(acc[t][h], out, h, m, t0 + t);
            }
        }
    }

    /// Q4_0 / Q4_1 tile × Q8 activations: unsigned nibbles × x via `maddubs` (four 16-bit
    /// partial sums stay below 2^15), the Q4_0 offset (−8·d) or Q4_1 minimum enters through
    /// `d_x · Σ q_x` (added to the even lane of each row's pair).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn t_q4<const MT: usize, const Q41: bool>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        let bb = TILE * if Q41 { 20 } else { 18 };
        let hdr = if Q41 { 32 } else { 16 };
        let (k, nb) = (a.k, a.nb);
        let ones = _mm256_set1_epi16(1);
        let m4 = _mm256_set1_epi8(0x0F);
        let idx = [
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
            _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
        ];
        let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let xs: [*const f32; MT] = std::array::from_fn(|t| a.s.as_ptr().add((t0 + t) * nb));
        let pf = if t0 == 0 { pf_dist() } else { 0 };
        let mut acc = [[_mm256_setzero_ps(); 2]; MT];
        for b in 0..nb {
            let blk = tile.add(b * bb);
            if pf != 0 {
                prefetch_range(blk.add(pf), bb);
            }
            let d8 = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let m8 = if Q41 {
                _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i))
            } else {
                _mm256_mul_ps(d8, _mm256_set1_ps(-8.0))
            };
            for h in 0..2 {
                let dexp = _mm256_permutevar8x32_ps(d8, idx[h]);
                let mexp = _mm256_blend_ps::<0b1010_1010>(
                    _mm256_permutevar8x32_ps(m8, idx[h]),
                    _mm256_setzero_ps(),
                );
                let w0 = _mm256_loadu_si256(blk.add(hdr + 32 * h) as *const __m256i);
                let w1 = _mm256_loadu_si256(blk.add(hdr + 64 + 32 * h) as *const __m256i);
                let n0 = _mm256_and_si256(w0, m4);
                let n1 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), m4);
                let n2 = _mm256_and_si256(w1, m4);
                let n3 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), m4);
                for t in 0..MT {
                    let x = xq[t].add(b * QK);
                    let s01 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(n0, bcast8(x)),
                        _mm256_maddubs_epi16(n1, bcast8(x.add(16))),
                    );
                    let s23 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(n2, bcast8(x.add(8))),
                        _mm256_maddubs_epi16(n3, bcast8(x.add(24))),
                    );
                    let p = _mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones);
                    let s = _mm256_mul_ps(dexp, _mm256_set1_ps(*xd[t].add(b)));
                    let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[t][h]);
                    acc[t][h] = _mm256_fmadd_ps(mexp, _mm256_set1_ps(*xs[t].add(b)), v);
                }
            }
        }
        for t in 0..MT {
            for h in 0..2 {
                store_pairs(acc[t][h], out, h, m, t0 + t);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn t_q4_0<const MT: usize>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        t_q4::<MT, false>(tile, a, t0, out, m)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn t_q4_1<const MT: usize>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        t_q4::<MT, true>(tile, a, t0, out, m)
    }

    /// The 32-bit lanes of `v` (one per row) picked by `idx` and doubled into an i16 pair.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn i16_pairs(v: __m256i, idx: __m256i) -> __m256i {
        let p = _mm256_permutevar8x32_epi32(v, idx);
        _mm256_or_si256(
            _mm256_and_si256(p, _mm256_set1_epi32(0xFFFF)),
            _mm256_slli_epi32(p, 16),
        )
    }

    /// Q4_K tile: per row `sc_j` (i32 lanes, 8 rows) and the mins as i16 pairs
    /// `[mn_2p, mn_2p+1]` (4 vectors), unpacked from the tile header.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4k_scales(blk: *const u8) -> ([__m256i; 8], [__m256i; 4]) {
        let m63 = _mm256_set1_epi32(63);
        let m15 = _mm256_set1_epi32(15);
        let mut sc = [_mm256_setzero_si256(); 8];
        let mut mnp = [_mm256_setzero_si256(); 4];
        for j in 0..8 {
            let raw = _mm256_cvtepu8_epi32(_mm_loadl_epi64(blk.add(32 + 8 * j) as *const __m128i));
            sc[j] = _mm256_and_si256(raw, m63);
            let lo =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(blk.add(96 + 8 * (j / 2)) as *const __m128i));
            let lo = if j % 2 == 1 {
                _mm256_srli_epi32(lo, 4)
            } else {
                lo
            };
            let mn = _mm256_or_si256(
                _mm256_slli_epi32(_mm256_srli_epi32(raw, 6), 4),
                _mm256_and_si256(lo, m15),
            );
            mnp[j / 2] = if j % 2 == 0 {
                mn
            } else {
                _mm256_or_si256(mnp[j / 2], _mm256_slli_epi32(mn, 16))
            };
        }
        (sc, mnp)
    }

    /// Σ_j mn_j · (sum of activation sub-block j) per row, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4k_mins(mnp: &[__m256i; 4], p: *const i32) -> __m256 {
        let mut im = _mm256_madd_epi16(mnp[0], _mm256_set1_epi32(*p));
        for (q, mv) in mnp.iter().enumerate().skip(1) {
            im = _mm256_add_epi32(im, _mm256_madd_epi16(*mv, _mm256_set1_epi32(*p.add(q))));
        }
        _mm256_cvtepi32_ps(im)
    }

    /// Q4_K tile × Q8_K activations, 4 rows per 32-byte vector: `maddubs` of nibbles × x
    /// (four 16-bit partial sums stay below 2^15), `madd` with the row's sub-block scale,
    /// the minimums through the activation's 32-value sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn t_q4k<const MT: usize>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        const SB: usize = TILE * 144;
        let (k, nb) = (a.k, a.nb);
        let m4 = _mm256_set1_epi8(0x0F);
        let idx = [
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
            _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
        ];
        let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let bp: [*const i32; MT] = std::array::from_fn(|t| a.bs32p.as_ptr().add((t0 + t) * nb * 4));
        let pf = if t0 == 0 { pf_dist() } else { 0 };
        let mut acc = [[_mm256_setzero_ps(); 2]; MT];
        let mut accm = [_mm256_setzero_ps(); MT];
        for b in 0..nb {
            let blk = tile.add(b * SB);
            if pf != 0 {
                prefetch_range(blk.add(pf), SB);
            }
            let d8 = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let dmin8 = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
            let (sc, mnp) = q4k_scales(blk);
            for h in 0..2 {
                let mut itot = [_mm256_setzero_si256(); MT];
                for c in 0..4 {
                    let scl = i16_pairs(sc[2 * c], idx[h]);
                    let sch = i16_pairs(sc[2 * c + 1], idx[h]);
                    let w: [__m256i; 4] = std::array::from_fn(|q| {
                        _mm256_loadu_si256(
                            blk.add(128 + 64 * (4 * c + q) + 32 * h) as *const __m256i
                        )
                    });
                    for t in 0..MT {
                        let x = xq[t].add(b * QK_K + 64 * c);
                        let mut sl = _mm256_setzero_si256();
                        let mut sh = _mm256_setzero_si256();
                        for (q, wq) in w.iter().enumerate() {
                            let lo = _mm256_and_si256(*wq, m4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(*wq, 4), m4);
                            sl = _mm256_add_epi16(
                                sl,
                                _mm256_maddubs_epi16(lo, bcast8(x.add(8 * q))),
                            );
                            sh = _mm256_add_epi16(
                                sh,
                                _mm256_maddubs_epi16(hi, bcast8(x.add(32 + 8 * q))),
                            );
                        }
                        let p = _mm256_add_epi32(
                            _mm256_madd_epi16(sl, scl),
                            _mm256_madd_epi16(sh, sch),
                        );
                        itot[t] = _mm256_add_epi32(itot[t], p);
                    }
                }
                let dexp = _mm256_permutevar8x32_ps(d8, idx[h]);
                for t in 0..MT {
                    let s = _mm256_mul_ps(dexp, _mm256_set1_ps(*xd[t].add(b)));
                    acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(itot[t]), s, acc[t][h]);
                }
            }
            for t in 0..MT {
                let s = _mm256_mul_ps(dmin8, _mm256_set1_ps(*xd[t].add(b)));
                accm[t] = _mm256_fmadd_ps(q4k_mins(&mnp, bp[t].add(b * 4)), s, accm[t]);
            }
        }
        for t in 0..MT {
            let mut mins = [0f32; 8];
            _mm256_storeu_ps(mins.as_mut_ptr(), accm[t]);
            for h in 0..2 {
                store_pairs(acc[t][h], out, h, m, t0 + t);
            }
            for (r, mv) in mins.iter().enumerate() {
                out[r * m + t0 + t] -= mv;
            }
        }
    }

    /// Q6_K tile scales: i16 pairs `[sc_2p, sc_2p+1]` per row (8 vectors) and each group's
    /// scale as i32 per row (16 vectors).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6k_scales(blk: *const u8) -> ([__m256i; 8], [__m256i; 16]) {
        let scp: [__m256i; 8] = std::array::from_fn(|p| {
            _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(16 + 16 * p) as *const __m128i))
        });
        let scg: [__m256i; 16] = std::array::from_fn(|g| {
            let v = scp[g / 2];
            if g % 2 == 0 {
                _mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16)
            } else {
                _mm256_srai_epi32(v, 16)
            }
        });
        (scp, scg)
    }

    /// Σ_g sc_g · (sum of activation group g) per row, as f32 (`bs`: the 16 group sums).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6k_offset(scp: &[__m256i; 8], bs: *const i16) -> __m256 {
        let pair = |p: usize| _mm256_set1_epi32((bs.add(2 * p) as *const i32).read_unaligned());
        let mut io = _mm256_madd_epi16(scp[0], pair(0));
        for (p, sv) in scp.iter().enumerate().skip(1) {
            io = _mm256_add_epi32(io, _mm256_madd_epi16(*sv, pair(p)));
        }
        _mm256_cvtepi32_ps(io)
    }

    /// The four 32-value runs of 6-bit quants (0..63) decoded from ggml's `ql` chunks `a`
    /// (values l), `b` (values l + 32) and `qh` chunk `h`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_decode(a: __m256i, b: __m256i, h: __m256i) -> [__m256i; 4] {
        let m4 = _mm256_set1_epi8(0x0F);
        let bits = |m: i8| _mm256_and_si256(h, _mm256_set1_epi8(m));
        [
            _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_slli_epi16(bits(0x03), 4)),
            _mm256_or_si256(_mm256_and_si256(b, m4), _mm256_slli_epi16(bits(0x0C), 2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), bits(0x30)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(b, 4), m4),
                _mm256_srli_epi16(bits(0xC0u8 as i8), 2),
            ),
        ]
    }

    /// Q6_K tile × Q8_K activations, 4 rows per 32-byte vector: `maddubs` of the unsigned
    /// quants × x (two 16-bit partial sums stay below 2^15), `madd` with the 16-value group
    /// scale; the −32 offset through the activation's 16-value sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn t_q6k<const MT: usize>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        const SB: usize = TILE * 210;
        let (k, nb) = (a.k, a.nb);
        let idx = [
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
            _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
        ];
        let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let xb: [*const i16; MT] =
            std::array::from_fn(|t| a.bsums.as_ptr().add((t0 + t) * nb * 16));
        let pf = if t0 == 0 { pf_dist() } else { 0 };
        let mut acc = [[_mm256_setzero_ps(); 2]; MT];
        let mut acco = [_mm256_setzero_ps(); MT];
        for b in 0..nb {
            let blk = tile.add(b * SB);
            if pf != 0 {
                prefetch_range(blk.add(pf), SB);
            }
            let d8 = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let (scp, scg) = q6k_scales(blk);
            for hh in 0..2 {
                let mut itot = [_mm256_setzero_si256(); MT];
                for h in 0..2 {
                    for s2 in 0..2 {
                        let mut isum = [[_mm256_setzero_si256(); 4]; MT];
                        for qq in 0..2 {
                            let q = 2 * s2 + qq;
                            let ld = |c: usize| {
                                _mm256_loadu_si256(blk.add(144 + 64 * c + 32 * hh) as *const __m256i)
                            };
                            let v = q6_decode(ld(8 * h + q), ld(8 * h + 4 + q), ld(16 + 4 * h + q));
                            for t in 0..MT {
                                let x = xq[t].add(b * QK_K + 128 * h + 8 * q);
                                for i in 0..4 {
                                    let p = _mm256_maddubs_epi16(v[i], bcast8(x.add(32 * i)));
                                    isum[t][i] = _mm256_add_epi16(isum[t][i], p);
                                }
                            }
                        }
                        for i in 0..4 {
                            let sv = i16_pairs(scg[8 * h + 2 * i + s2], idx[hh]);
                            for t in 0..MT {
                                let p = _mm256_madd_epi16(isum[t][i], sv);
                                itot[t] = _mm256_add_epi32(itot[t], p);
                            }
                        }
                    }
                }
                let dexp = _mm256_permutevar8x32_ps(d8, idx[hh]);
                for t in 0..MT {
                    let s = _mm256_mul_ps(dexp, _mm256_set1_ps(*xd[t].add(b)));
                    acc[t][hh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(itot[t]), s, acc[t][hh]);
                }
            }
            for t in 0..MT {
                let s = _mm256_mul_ps(d8, _mm256_set1_ps(32.0 * *xd[t].add(b)));
                acco[t] = _mm256_fmadd_ps(q6k_offset(&scp, xb[t].add(b * 16)), s, acco[t]);
            }
        }
        for t in 0..MT {
            let mut off = [0f32; 8];
            _mm256_storeu_ps(off.as_mut_ptr(), acco[t]);
            for h in 0..2 {
                store_pairs(acc[t][h], out, h, m, t0 + t);
            }
            for (r, o) in off.iter().enumerate() {
                out[r * m + t0 + t] -= o;
            }
        }
    }
}

/// AVX-512 VNNI tile kernels: one 64-byte load is a whole tile chunk (8 rows × 8 bytes),
/// `vpdpbusd` takes u8 × i8 four at a time into 32-bit lanes, each row's sum spread over a
/// pair of lanes until the end.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn bcast8(p: *const u8) -> __m512i {
        _mm512_set1_epi64((p as *const i64).read_unaligned())
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn load(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p as *const _)
    }

    /// Lanes (2r, 2r+1) hold row r: `out[r * m + t] = v[2r] + v[2r + 1]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn store_pairs(v: __m512, out: &mut [f32], m: usize, t: usize) {
        let mut tmp = [0f32; 16];
        _mm512_storeu_ps(tmp.as_mut_ptr(), v);
        for r in 0..TILE {
            out[r * m + t] = tmp[2 * r] + tmp[2 * r + 1];
        }
    }

    /// The 8 rows' f16 values at `p`, each duplicated into its lane pair.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn f16x8_pairs(p: *const u8, idx: __m512i) -> __m512 {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(v))
    }

    /// Q8_0 tile × Q8 activations stored as u8 (`q + 128`): `vpdpbusd(x_u8, w_i8)` minus
    /// `128 · Σ w` (computed once per block for all activation rows).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn t_q8_0<const MT: usize>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        const BB: usize = TILE * 34;
        let (k, nb) = (a.k, a.nb);
        let idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let c128 = _mm512_set1_epi8(0x80u8 as i8);
        let xu: [*const u8; MT] = std::array::from_fn(|t| a.xu.as_ptr().add((t0 + t) * k));
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let pf = if t0 == 0 { pf_dist() } else { 0 };
        let mut acc = [_mm512_setzero_ps(); MT];
        for b in 0..nb {
            let blk = tile.add(b * BB);
            if pf != 0 {
                avx2::prefetch_range(blk.add(pf), BB);
            }
            let dexp = f16x8_pairs(blk, idx);
            let w: [__m512i; 4] = std::array::from_fn(|c| load(blk.add(16 + 64 * c)));
            let mut corr = _mm512_setzero_si512();
            for wc in &w {
                corr = _mm512_dpbusd_epi32(corr, c128, *wc);
            }
            let neg = _mm512_sub_epi32(_mm512_setzero_si512(), corr);
            for t in 0..MT {
                let x = xu[t].add(b * QK);
                let mut i = neg;
                for (c, wc) in w.iter().enumerate() {
                    i = _mm512_dpbusd_epi32(i, bcast8(x.add(8 * c)), *wc);
                }
                let s = _mm512_mul_ps(dexp, _mm512_set1_ps(*xd[t].add(b)));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, acc[t]);
            }
        }
        for t in 0..MT {
            store_pairs(acc[t], out, m, t0 + t);
        }
    }

    /// Q4_0 / Q4_1 tile × Q8 activations: `vpdpbusd(nibbles_u8, x_i8)`; the offset or
    /// minimum enters through `d_x · Σ q_x` on the even lane of each row's pair.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn t_q4<const MT: usize, const Q41: bool>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        let bb = TILE * if Q41 { 20 } else { 18 };
        let hdr = if Q41 { 32 } else { 16 };
        let (k, nb) = (a.k, a.nb);
        let idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let m4 = _mm512_set1_epi8(0x0F);
        let xq: [*const u8; MT] =
            std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k) as *const u8);
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let xs: [*const f32; MT] = std::array::from_fn(|t| a.s.as_ptr().add((t0 + t) * nb));
        let pf = if t0 == 0 { pf_dist() } else { 0 };
        let mut acc = [_mm512_setzero_ps(); MT];
        for b in 0..nb {
            let blk = tile.add(b * bb);
            if pf != 0 {
                avx2::prefetch_range(blk.add(pf), bb);
            }
            let dexp = f16x8_pairs(blk, idx);
            let mexp = if Q41 {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
                _mm512_maskz_permutexvar_ps(0x5555, idx, _mm512_castps256_ps512(v))
            } else {
                _mm512_maskz_mul_ps(0x5555, dexp, _mm512_set1_ps(-8.0))
            };
            let w0 = load(blk.add(hdr));
            let w1 = load(blk.add(hdr + 64));
            let n0 = _mm512_and_si512(w0, m4);
            let n1 = _mm512_and_si512(_mm512_srli_epi16::<4>(w0), m4);
            let n2 = _mm512_and_si512(w1, m4);
            let n3 = _mm512_and_si512(_mm512_srli_epi16::<4>(w1), m4);
            for t in 0..MT {
                let x = xq[t].add(b * QK);
                let mut i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), n0, bcast8(x));
                i = _mm512_dpbusd_epi32(i, n1, bcast8(x.add(16)));
                i = _mm512_dpbusd_epi32(i, n2, bcast8(x.add(8)));
                i = _mm512_dpbusd_epi32(i, n3, bcast8(x.add(24)));
                let s = _mm512_mul_ps(dexp, _mm512_set1_ps(*xd[t].add(b)));
                let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, acc[t]);
                acc[t] = _mm512_fmadd_ps(mexp, _mm512_set1_ps(*xs[t].add(b)), v);
            }
        }
        for t in 0..MT {
            store_pairs(acc[t], out, m, t0 + t);
        }
    }

    /// Q4_K tile × Q8_K activations: `vpdpbusd(nibbles_u8, x_i8)` per 32-value sub-block,
    /// times the row's 6-bit scale in 32-bit lanes; the minimums through the activation's
    /// 32-value sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn t_q4k<const MT: usize>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        const SB: usize = TILE * 144;
        let (k, nb) = (a.k, a.nb);
        let idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let m4 = _mm512_set1_epi8(0x0F);
        let xq: [*const u8; MT] =
            std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k) as *const u8);
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let bp: [*const i32; MT] = std::array::from_fn(|t| a.bs32p.as_ptr().add((t0 + t) * nb * 4));
        let pf = if t0 == 0 { pf_dist() } else { 0 };
        let mut acc = [_mm512_setzero_ps(); MT];
        let mut accm = [_mm256_setzero_ps(); MT];
        for b in 0..nb {
            let blk = tile.add(b * SB);
            if pf != 0 {
                avx2::prefetch_range(blk.add(pf), SB);
            }
            let dexp = f16x8_pairs(blk, idx);
            let dmin8 = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
            let (sc, mnp) = avx2::q4k_scales(blk);
            let scx: [__m512i; 8] = std::array::from_fn(|j| {
                _mm512_permutexvar_epi32(idx, _mm512_castsi256_si512(sc[j]))
            });
            let mut itot = [_mm512_setzero_si512(); MT];
            for c in 0..4 {
                let w: [__m512i; 4] =
                    std::array::from_fn(|q| load(blk.add(128 + 64 * (4 * c + q))));
                let lo: [__m512i; 4] = std::array::from_fn(|q| _mm512_and_si512(w[q], m4));
                let hi: [__m512i; 4] =
                    std::array::from_fn(|q| _mm512_and_si512(_mm512_srli_epi16::<4>(w[q]), m4));
                for t in 0..MT {
                    let x = xq[t].add(b * QK_K + 64 * c);
                    let mut il = _mm512_setzero_si512();
                    let mut ih = _mm512_setzero_si512();
                    for q in 0..4 {
                        il = _mm512_dpbusd_epi32(il, lo[q], bcast8(x.add(8 * q)));
                        ih = _mm512_dpbusd_epi32(ih, hi[q], bcast8(x.add(32 + 8 * q)));
                    }
                    let p = _mm512_add_epi32(
                        _mm512_mullo_epi32(il, scx[2 * c]),
                        _mm512_mullo_epi32(ih, scx[2 * c + 1]),
                    );
                    itot[t] = _mm512_add_epi32(itot[t], p);
                }
            }
            for t in 0..MT {
                let dx = *xd[t].add(b);
                let s = _mm512_mul_ps(dexp, _mm512_set1_ps(dx));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(itot[t]), s, acc[t]);
                let sm = _mm256_mul_ps(dmin8, _mm256_set1_ps(dx));
                accm[t] = _mm256_fmadd_ps(avx2::q4k_mins(&mnp, bp[t].add(b * 4)), sm, accm[t]);
            }
        }
        for t in 0..MT {
            let mut mins = [0f32; 8];
            _mm256_storeu_ps(mins.as_mut_ptr(), accm[t]);
            store_pairs(acc[t], out, m, t0 + t);
            for (r, mv) in mins.iter().enumerate() {
                out[r * m + t0 + t] -= mv;
            }
        }
    }

    /// Q6_K tile × Q8_K activations: `vpdpbusd(quants_u8, x_i8)` per 16-value group, times
    /// the group's i8 scale in 32-bit lanes; the −32 offset through the activation's
    /// 16-value sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn t_q6k<const MT: usize>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        const SB: usize = TILE * 210;
        let (k, nb) = (a.k, a.nb);
        let idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let m4 = _mm512_set1_epi8(0x0F);
        let bits = |h: __m512i, m: u8| _mm512_and_si512(h, _mm512_set1_epi8(m as i8));
        let xq: [*const u8; MT] =
            std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k) as *const u8);
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let xb: [*const i16; MT] =
            std::array::from_fn(|t| a.bsums.as_ptr().add((t0 + t) * nb * 16));
        let pf = if t0 == 0 { pf_dist() } else { 0 };
        let mut acc = [_mm512_setzero_ps(); MT];
        let mut acco = [_mm256_setzero_ps(); MT];
        for b in 0..nb {
            let blk = tile.add(b * SB);
            if pf != 0 {
                avx2::prefetch_range(blk.add(pf), SB);
            }
            let d8 = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let dexp = _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(d8));
            let (scp, scg) = avx2::q6k_scales(blk);
            let scx: [__m512i; 16] = std::array::from_fn(|g| {
                _mm512_permutexvar_epi32(idx, _mm512_castsi256_si512(scg[g]))
            });
            let mut itot = [_mm512_setzero_si512(); MT];
            for h in 0..2 {
                for s2 in 0..2 {
                    let mut isum = [[_mm512_setzero_si512(); 4]; MT];
                    for qq in 0..2 {
                        let q = 2 * s2 + qq;
                        let qa = load(blk.add(144 + 64 * (8 * h + q)));
                        let qb = load(blk.add(144 + 64 * (8 * h + 4 + q)));
                        let qh = load(blk.add(144 + 64 * (16 + 4 * h + q)));
                        let v = [
                            _mm512_or_si512(
                                _mm512_and_si512(qa, m4),
                                _mm512_slli_epi16::<4>(bits(qh, 0x03)),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(qb, m4),
                                _mm512_slli_epi16::<2>(bits(qh, 0x0C)),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16::<4>(qa), m4),
                                bits(qh, 0x30),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16::<4>(qb), m4),
                                _mm512_srli_epi16::<2>(bits(qh, 0xC0)),
                            ),
                        ];
                        for t in 0..MT {
                            let x = xq[t].add(b * QK_K + 128 * h + 8 * q);
                            for i in 0..4 {
                                isum[t][i] =
                                    _mm512_dpbusd_epi32(isum[t][i], v[i], bcast8(x.add(32 * i)));
                            }
                        }
                    }
                    for t in 0..MT {
                        for i in 0..4 {
                            let p = _mm512_mullo_epi32(isum[t][i], scx[8 * h + 2 * i + s2]);
                            itot[t] = _mm512_add_epi32(itot[t], p);
                        }
                    }
                }
            }
            for t in 0..MT {
                let dx = *xd[t].add(b);
                let s = _mm512_mul_ps(dexp, _mm512_set1_ps(dx));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(itot[t]), s, acc[t]);
                let so = _mm256_mul_ps(d8, _mm256_set1_ps(32.0 * dx));
                acco[t] = _mm256_fmadd_ps(avx2::q6k_offset(&scp, xb[t].add(b * 16)), so, acco[t]);
            }
        }
        for t in 0..MT {
            let mut off = [0f32; 8];
            _mm256_storeu_ps(off.as_mut_ptr(), acco[t]);
            store_pairs(acc[t], out, m, t0 + t);
            for (r, o) in off.iter().enumerate() {
                out[r * m + t0 + t] -= o;
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn t_q4_0<const MT: usize>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        t_q4::<MT, false>(tile, a, t0, out, m)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn t_q4_1<const MT: usize>(
        tile: *const u8,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        t_q4::<MT, true>(tile, a, t0, out, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u32) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        }
    }

    fn randv(n: usize, seed: u32) -> Vec<f32> {
        let mut r = rng(seed);
        (0..n).map(|_| r()).collect()
    }

    fn ref_matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn cols_for(kind: QuantKind) -> usize {
        if kind.block_size() == QK_K {
            512
        } else {
            96
        }
    }

    #[test]
    fn parse_and_sizes() {
        for k in QuantKind::ALL {
            assert_eq!(QuantKind::parse(k.name()), Some(k));
            assert_eq!(QuantKind::from_ggml_type(k.ggml_type()), Some(k));
        }
        assert_eq!("Q4_K".parse::<QuantKind>().unwrap(), QuantKind::Q4K);
        assert!("q5_k".parse::<QuantKind>().is_err());
        assert_eq!(
            std::mem::size_of::<BlockQ8_0>(),
            QuantKind::Q8_0.block_bytes()
        );
        assert_eq!(
            std::mem::size_of::<BlockQ4_0>(),
            QuantKind::Q4_0.block_bytes()
        );
        assert_eq!(
            std::mem::size_of::<BlockQ4_1>(),
            QuantKind::Q4_1.block_bytes()
        );
        assert_eq!(
            std::mem::size_of::<BlockQ4K>(),
            QuantKind::Q4K.block_bytes()
        );
        assert_eq!(
            std::mem::size_of::<BlockQ6K>(),
            QuantKind::Q6K.block_bytes()
        );
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(QMatrix::quantize(&[0.0; 3 * 48], 3, 48, QuantKind::Q8_0).is_err());
        assert!(QMatrix::quantize(&[0.0; 2 * 288], 2, 288, QuantKind::Q4K).is_err());
        assert!(QMatrix::quantize(&[0.0; 2 * 32], 2, 32, QuantKind::Q8_0).is_ok());
        assert!(QMatrix::from_ggml_bytes(QuantKind::Q8_0, 2, 32, &[0u8; 67]).is_err());
        assert!(QMatrix::from_ggml_bytes(QuantKind::Q8_0, 2, 32, &[0u8; 68]).is_ok());
    }

    /// Relative RMS error of quantize→dequantize on uniform [-0.5, 0.5) data.
    #[test]
    fn quantize_dequantize_error() {
        for (kind, bound) in [
            (QuantKind::Q8_0, 0.006),
            (QuantKind::Q4_0, 0.12),
            (QuantKind::Q4_1, 0.08),
            (QuantKind::Q4K, 0.08),
            (QuantKind::Q6K, 0.025),
        ] {
            let (rows, cols) = (7, 1024);
            let w = randv(rows * cols, 3);
            let q = QMatrix::quantize(&w, rows, cols, kind).unwrap();
            assert_eq!(q.storage_bytes(), stored_rows(rows) * kind.row_bytes(cols));
            let d = q.dequantize();
            let err: f64 = w
                .iter()
                .zip(&d)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            let norm: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
            let rel = (err / norm).sqrt();
            assert!(rel < bound, "{kind}: relative rms error {rel}");
            // max abs error bounded by a step of the block's grid
            let max = w
                .iter()
                .zip(&d)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let step = match kind {
                QuantKind::Q8_0 => 0.5 / 127.0,
                QuantKind::Q6K => 1.0 / 32.0,
                _ => 1.0 / 8.0,
            };
            assert!(max <= step, "{kind}: max abs error {max}");
        }
    }

    #[test]
    fn matmul_matches_dequantized_f32() {
        for kind in QuantKind::ALL {
            let (n, k) = (37, cols_for(kind));
            let w = randv(n * k, 11);
            let q = QMatrix::quantize(&w, n, k, kind).unwrap();
            let wd = q.dequantize();
            for m in [1usize, 3, 16, 40] {
                let x = randv(m * k, 100 + m as u32);
                let want = ref_matmul(&x, m, k, &wd, n);
                let got = q.matmul(&x, m);
                assert_eq!(got.len(), m * n);
                // activations rounded to 8 bits: error ~ |x|·|w|·sqrt(k)·2^-8
                let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
                let tol = 0.02 * scale.max(1.0);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= tol,
                        "{kind} m={m} [{i}]: {g} vs {e} (tol {tol})"
                    );
                }
                // every level of the integer kernel, including the scalar fallback
                for lv in levels() {
                    let got = q.matmul_at(&x, m, lv);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        let tol = 0.02 * scale.max(1.0);
                        assert!(
                            (g - e).abs() <= tol,
                            "{kind} {lv:?} m={m} [{i}]: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    fn levels() -> Vec<Level> {
        available_levels()
    }

    #[test]
    fn scalar_equals_simd() {
        let all = levels();
        if all.len() < 2 {
            eprintln!("no SIMD level on this CPU; skipped");
            return;
        }
        for kind in QuantKind::ALL {
            let (n, k) = (19, 2 * cols_for(kind));
            let q = QMatrix::quantize(&randv(n * k, 5), n, k, kind).unwrap();
            for m in [1usize, 2, 5, 16] {
                let x = randv(m * k, 7 + m as u32);
                let a = q.matmul_at(&x, m, Level::Scalar);
                for &lv in &all[1..] {
                    let b = q.matmul_at(&x, m, lv);
                    for (i, (u, v)) in a.iter().zip(&b).enumerate() {
                        assert!(
                            (u - v).abs() <= 1e-5 * (1.0 + u.abs()),
                            "{kind} {lv:?} m={m} [{i}]: {u} vs {v}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn activation_quantizers_agree() {
        for kind in [QuantKind::Q8_0, QuantKind::Q4K] {
            let (m, k) = (3, 512);
            let mut x = randv(m * k, 9);
            x[5] = 0.0;
            x[300..556].iter_mut().for_each(|v| *v = 0.0);
            let s = QAct::new(kind, &x, m, k, Level::Scalar);
            for lv in levels() {
                let v = QAct::new(kind, &x, m, k, lv);
                assert_eq!(s.qs, v.qs, "{kind} {lv:?}");
                assert_eq!(s.d, v.d);
                assert_eq!(s.s, v.s);
                assert_eq!(s.bsums, v.bsums);
            }
        }
    }

    #[test]
    fn ggml_bytes_round_trip_with_candle() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        for (kind, dt) in [
            (QuantKind::Q8_0, GgmlDType::Q8_0),
            (QuantKind::Q4_0, GgmlDType::Q4_0),
            (QuantKind::Q4_1, GgmlDType::Q4_1),
            (QuantKind::Q4K, GgmlDType::Q4K),
            (QuantKind::Q6K, GgmlDType::Q6K),
        ] {
            let (n, k) = (5, 512);
            let w = randv(n * k, 21);
            let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
            let qt = QTensor::quantize(&t, dt).unwrap();
            let bytes = qt.data().unwrap();
            let q = QMatrix::from_ggml_bytes(kind, n, k, &bytes).unwrap();
            assert_eq!(q.to_ggml_bytes(), &bytes[..], "{kind}");
            // our quantizer produces candle's (= ggml's reference) bytes
            assert_eq!(
                QMatrix::quantize(&w, n, k, kind).unwrap().to_ggml_bytes(),
                &bytes[..],
                "{kind}"
            );
            let want = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(q.dequantize(), want, "{kind}");
        }
    }

    /// Shapes large enough for the rayon paths (kernel tasks and activation quantization).
    #[test]
    fn parallel_paths() {
        for (kind, n, k, m) in [
            (QuantKind::Q8_0, 1030, 512, 1),
            (QuantKind::Q4K, 301, 2048, 20),
        ] {
            let q = QMatrix::quantize(&randv(n * k, 31), n, k, kind).unwrap();
            assert!(q.storage_bytes() * m >= SEQ_BYTES && m * k >= 32768 || m == 1);
            let x = randv(m * k, 32);
            let want = ref_matmul(&x, m, k, &q.dequantize(), n);
            let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1.0);
            for lv in levels() {
                let got = q.matmul_at(&x, m, lv);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 0.02 * scale,
                        "{kind} {lv:?} [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_rows_and_zero_inputs() {
        let q = QMatrix::quantize(&vec![0.0; 3 * 256], 3, 256, QuantKind::Q4K).unwrap();
        assert_eq!(q.matmul(&vec![0.0; 2 * 256], 2), vec![0.0; 6]);
        let q = QMatrix::quantize(&[], 0, 64, QuantKind::Q8_0).unwrap();
        assert!(q.matmul(&vec![1.0; 64], 1).is_empty());
    }
}
