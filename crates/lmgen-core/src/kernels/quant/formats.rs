//! ggml block formats: quantize / dequantize through candle's ports of ggml's
//! reference code, and the 8-row tile layout the kernels read.
use super::{stored_rows, QuantKind, TILE};
use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ6K, BlockQ8_0, GgmlType,
};
use rayon::prelude::*;

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
    thread_local! {
        /// Aligned copies of the blocks (2-byte alignment, as the blocks' f16 fields need),
        /// grown and reused: gathering an embedding row allocates nothing.
        static BLOCKS: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let n = src.len() / std::mem::size_of::<B>();
    let bytes = n * std::mem::size_of::<B>();
    if std::mem::align_of::<B>() > std::mem::align_of::<u16>() {
        let mut blocks = vec![B::zeros(); n];
        // SAFETY: every bit pattern is a valid block (plain f16 / integer fields); the copy
        // fills exactly `n` blocks, and `blocks` is properly aligned.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes)
        };
        return B::to_float(&blocks, dst);
    }
    BLOCKS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() * 2 < bytes {
            b.resize(bytes.div_ceil(2), 0);
        }
        // SAFETY: the buffer holds at least `bytes` bytes, 2-byte aligned (checked above to
        // suffice for `B`); every bit pattern is a valid block, and `n` whole blocks are copied
        // before they are read.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), b.as_mut_ptr() as *mut u8, bytes);
            B::to_float(std::slice::from_raw_parts(b.as_ptr() as *const B, n), dst);
        }
    })
}

/// Quantizes whole rows into ggml-layout blocks.
pub(super) fn quantize_bytes(kind: QuantKind, src: &[f32], dst: &mut [u8]) {
    match kind {
        QuantKind::Q8_0 => quantize_into::<BlockQ8_0>(src, dst),
        QuantKind::Q4_0 => quantize_into::<BlockQ4_0>(src, dst),
        QuantKind::Q4_1 => quantize_into::<BlockQ4_1>(src, dst),
        QuantKind::Q4K => quantize_into::<BlockQ4K>(src, dst),
        QuantKind::Q6K => quantize_into::<BlockQ6K>(src, dst),
    }
}

/// Dequantizes ggml-layout blocks.
pub(super) fn dequantize_bytes(kind: QuantKind, src: &[u8], dst: &mut [f32]) {
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

pub(super) fn pack_tiles(kind: QuantKind, rows: usize, cols: usize, ggml: &[u8]) -> Vec<u8> {
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
pub(super) fn unpack_row(kind: QuantKind, data: &[u8], cols: usize, row: usize, out: &mut [u8]) {
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

#[inline(always)]
pub(super) fn f16_at(p: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([p[off], p[off + 1]])).to_f32()
}

/// ggml's 6-bit scale/min unpacking for Q4_K.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
