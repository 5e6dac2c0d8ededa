//! Weights stored as f32, bf16 or f16 (a checkpoint's own dtype, used in place), widened to
//! f32 just before the product kernels read them: a block of rows at a time into a per-thread
//! buffer that stays in L1/L2. Widening is exact, and the kernels then run exactly as on f32
//! weights, so a half-precision weight gives the bits of the same weight widened at load, while
//! memory holds (and decode reads) half the bytes.
use std::cell::RefCell;

/// Consecutive values of a weight in one of the stored dtypes.
#[derive(Clone, Copy, Debug)]
pub enum WSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

impl<'a> WSlice<'a> {
    pub fn len(&self) -> usize {
        match self {
            WSlice::F32(s) => s.len(),
            WSlice::Bf16(s) | WSlice::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start..end`.
    pub fn range(&self, start: usize, end: usize) -> WSlice<'a> {
        match *self {
            WSlice::F32(s) => WSlice::F32(&s[start..end]),
            WSlice::Bf16(s) => WSlice::Bf16(&s[start..end]),
            WSlice::F16(s) => WSlice::F16(&s[start..end]),
        }
    }

    /// Values `start..end`, or `None` where the range is outside.
    pub fn get(&self, start: usize, end: usize) -> Option<WSlice<'a>> {
        (start <= end && end <= self.len()).then(|| self.range(start, end))
    }

    /// Values from `start` on.
    pub fn from(&self, start: usize) -> WSlice<'a> {
        self.range(start, self.len())
    }

    /// Bytes per value.
    pub fn elem_bytes(&self) -> usize {
        match self {
            WSlice::F32(_) => 4,
            WSlice::Bf16(_) | WSlice::F16(_) => 2,
        }
    }

    /// The values themselves where they are f32.
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        match *self {
            WSlice::F32(s) => Some(s),
            _ => None,
        }
    }

    /// The values as f32 into `dst` (same length); exact.
    pub fn widen_into(&self, dst: &mut [f32]) {
        assert_eq!(dst.len(), self.len(), "widen: lengths differ");
        match *self {
            WSlice::F32(s) => dst.copy_from_slice(s),
            WSlice::Bf16(s) => widen_bf16(s, dst),
            WSlice::F16(s) => widen_f16(s, dst),
        }
    }

    /// The values as f32: borrowed where they are f32, else widened into `buf`.
    #[inline]
    pub fn f32_in<'b>(&self, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            WSlice::F32(s) => s,
            _ => {
                let dst = &mut buf[..self.len()];
                self.widen_into(dst);
                dst
            }
        }
    }

    /// A copy as f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.len()];
        self.widen_into(&mut v);
        v
    }
}

thread_local! {
    /// Per-thread buffer for widened weight rows (grown, never shrunk: no allocation in the
    /// steady state of a job).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` with this thread's widening buffer of at least `len` values (not re-entrant: the
/// kernels call it once per task, around their loop).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        // Nested use (not done by the kernels): a buffer of its own.
        Err(_) => f(&mut vec![0f32; len]),
    })
}

use super::simd::{bf16_to_f32, f16_to_f32};

fn widen_bf16(s: &[u16], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2_fma() {
        // SAFETY: AVX2 checked; equal lengths asserted by the caller.
        return unsafe { avx2_bf16(s, d) };
    }
    for (o, &h) in d.iter_mut().zip(s) {
        *o = bf16_to_f32(h);
    }
}

fn widen_f16(s: &[u16], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: F16C and AVX checked; equal lengths asserted by the caller.
        return unsafe { f16c(s, d) };
    }
    for (o, &h) in d.iter_mut().zip(s) {
        *o = f16_to_f32(h);
    }
}

/// Whether the CPU can widen f16 in registers (F16C, with AVX).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_f16c() -> bool {
    is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_f16c() -> bool {
    false
}

/// One cache line 4 KiB ahead of value `i` along a weight stream: the stream crosses page
/// boundaries, where the hardware prefetcher stops (as the f32 streaming kernel does).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(s: &[u16], i: usize) {
    use std::arch::x86_64::*;
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().wrapping_add(i + 2048) as *const i8) };
}

/// A widening loop: 8 values at a time with `$vec`, the rest with `$one`.
macro_rules! widen_loop {
    ($name:ident, $features:literal, $vec:path, $one:path) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(s: &[u16], d: &mut [f32]) {
            let n = s.len().min(d.len());
            let mut i = 0;
            while i + 8 <= n {
                if i % 32 == 0 {
                    prefetch_ahead(s, i);
                }
                let v = $vec(s.as_ptr().add(i));
                std::arch::x86_64::_mm256_storeu_ps(d.as_mut_ptr().add(i), v);
                i += 8;
            }
            for j in i..n {
                d[j] = $one(s[j]);
            }
        }
    };
}

widen_loop!(avx2_bf16, "avx2", super::simd::bf16x8, bf16_to_f32);
widen_loop!(f16c, "avx,f16c", super::simd::f16x8, f16_to_f32);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every bf16 and f16 bit pattern widens to the value `half` gives (NaNs stay NaN).
    #[test]
    fn widening_is_exact_for_every_bit_pattern() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut got = vec![0f32; all.len()];
        WSlice::Bf16(&all).widen_into(&mut got);
        for (&h, g) in all.iter().zip(&got) {
            let e = half::bf16::from_bits(h).to_f32();
            assert!(
                g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
                "bf16 {h:#x}"
            );
        }
        WSlice::F16(&all).widen_into(&mut got);
        for (&h, g) in all.iter().zip(&got) {
            let e = half::f16::from_bits(h).to_f32();
            assert!(
                g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
                "f16 {h:#x}"
            );
        }
        // Odd lengths take the scalar tail.
        let mut seven = [0f32; 7];
        WSlice::Bf16(&all[0x3f80..0x3f87]).widen_into(&mut seven);
        assert_eq!(seven[0], 1.0);
    }

    #[test]
    fn ranges_and_borrowing() {
        let v = [1.0f32, 2.0, 3.0];
        let w = WSlice::F32(&v);
        assert_eq!(w.range(1, 3).as_f32(), Some(&v[1..]));
        assert!(w.get(2, 4).is_none());
        let mut buf = [0f32; 4];
        assert_eq!(w.f32_in(&mut buf), &v);
        let h = [0x3f80u16, 0x4000];
        assert_eq!(WSlice::Bf16(&h).f32_in(&mut buf), &[1.0, 2.0]);
        assert_eq!(WSlice::Bf16(&h).elem_bytes(), 2);
    }
}
