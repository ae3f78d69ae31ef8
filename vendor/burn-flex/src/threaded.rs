//! mitune patch (see `PATCHES.md`): element-wise loops split over rayon's threads, compiled for the widest SIMD
//! the CPU has, and an `exp` that vectorises (used by the sigmoid).
//!
//! The published crate runs unary maths (`exp`, `log`, `sqrt`, sigmoid, …) on one thread at every size, binary
//! and scalar ops on one thread below 4M elements, and its sigmoid calls libm's scalar `expf`. A transformer step's
//! activations are [batch·seq, hidden] ≈ 1M elements, so half of a training step left every core but one idle.
//!
//! Every helper here is element-wise: splitting the work changes no result, and the target-feature variants run the
//! same Rust (no FMA contraction: Rust never fuses `a * b + c`), so all paths give the same bits.

use alloc::vec::Vec;
use core::mem::MaybeUninit;

#[cfg(feature = "rayon")]
use rayon::prelude::*;

/// Fewest elements worth sending to rayon (a few µs of work at memory speed).
#[cfg(feature = "rayon")]
const MIN_PARALLEL: usize = 32 * 1024;
/// Smallest piece a thread takes.
#[cfg(feature = "rayon")]
const MIN_CHUNK: usize = 8 * 1024;

/// Piece length for `n` elements, or `None` to stay on this thread.
#[inline]
fn chunk_len(n: usize) -> Option<usize> {
    #[cfg(feature = "rayon")]
    {
        let threads = rayon::current_num_threads();
        if threads > 1 && n >= MIN_PARALLEL {
            // A few pieces per thread so a thread slowed by the OS does not hold the others back.
            return Some(n.div_ceil(threads * 4).max(MIN_CHUNK).next_multiple_of(64));
        }
    }
    let _ = n;
    None
}

/// Runs `body` compiled with AVX-512 or AVX2 when the CPU has them (the loops in `body` are written to
/// auto-vectorise), else as compiled for the baseline target.
macro_rules! widest {
    ($name:ident, [$($g:tt)*], ($($arg:ident : $ty:ty),*), $body:block) => {
        #[inline]
        fn $name<$($g)*>($($arg: $ty),*) {
            #[inline(always)]
            fn body<$($g)*>($($arg: $ty),*) $body

            #[cfg(all(target_arch = "x86_64", feature = "std"))]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4<$($g)*>($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3<$($g)*>($($arg: $ty),*) { body($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use widest;

widest!(map_serial, [E: Copy, Op: Fn(E) -> E], (a: &mut [E], op: &Op), {
    for x in a.iter_mut() {
        *x = op(*x);
    }
});

widest!(map_into_serial, [E: Copy, R, Op: Fn(E) -> R], (src: &[E], dst: &mut [MaybeUninit<R>], op: &Op), {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(op(s));
    }
});

widest!(zip_serial, [E: Copy, S: Copy, Op: Fn(E, S) -> E], (a: &mut [E], b: &[S], op: &Op), {
    for (x, &y) in a.iter_mut().zip(b) {
        *x = op(*x, y);
    }
});

widest!(zip_into_serial, [L: Copy, R: Copy, Out, Op: Fn(L, R) -> Out],
    (a: &[L], b: &[R], dst: &mut [MaybeUninit<Out>], op: &Op), {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        d.write(op(x, y));
    }
});

/// `x ← op(x)` over `a`.
pub(crate) fn map_inplace<E, Op>(a: &mut [E], op: Op)
where
    E: Copy + Send,
    Op: Fn(E) -> E + Sync,
{
    match chunk_len(a.len()) {
        #[cfg(feature = "rayon")]
        Some(c) => a.par_chunks_mut(c).for_each(|s| map_serial(s, &op)),
        _ => map_serial(a, &op),
    }
}

/// A new vector `op(x)` for each `x` of `src`, written once (no zero-fill first).
pub(crate) fn map_collect<E, R, Op>(src: &[E], op: Op) -> Vec<R>
where
    E: Copy + Sync,
    R: Send,
    Op: Fn(E) -> R + Sync,
{
    let n = src.len();
    let mut out: Vec<R> = Vec::with_capacity(n);
    {
        let dst = &mut out.spare_capacity_mut()[..n];
        match chunk_len(n) {
            #[cfg(feature = "rayon")]
            Some(c) => dst
                .par_chunks_mut(c)
                .zip(src.par_chunks(c))
                .for_each(|(d, s)| map_into_serial(s, d, &op)),
            _ => map_into_serial(src, dst, &op),
        }
    }
    // SAFETY: every one of the first n slots was written above.
    unsafe { out.set_len(n) };
    out
}

/// `x ← op(x, y)` over `a` and `b` (same length).
pub(crate) fn zip_inplace<E, S, Op>(a: &mut [E], b: &[S], op: Op)
where
    E: Copy + Send,
    S: Copy + Sync,
    Op: Fn(E, S) -> E + Sync,
{
    debug_assert_eq!(a.len(), b.len());
    match chunk_len(a.len()) {
        #[cfg(feature = "rayon")]
        Some(c) => a
            .par_chunks_mut(c)
            .zip(b.par_chunks(c))
            .for_each(|(x, y)| zip_serial(x, y, &op)),
        _ => zip_serial(a, b, &op),
    }
}

/// A new vector `op(x, y)` over `a` and `b` (same length), written once.
pub(crate) fn zip_collect<L, R, Out, Op>(a: &[L], b: &[R], op: Op) -> Vec<Out>
where
    L: Copy + Sync,
    R: Copy + Sync,
    Out: Send,
    Op: Fn(L, R) -> Out + Sync,
{
    debug_assert_eq!(a.len(), b.len());
    let n = a.len();
    let mut out: Vec<Out> = Vec::with_capacity(n);
    {
        let dst = &mut out.spare_capacity_mut()[..n];
        match chunk_len(n) {
            #[cfg(feature = "rayon")]
            Some(c) => dst
                .par_chunks_mut(c)
                .zip(a.par_chunks(c).zip(b.par_chunks(c)))
                .for_each(|(d, (x, y))| zip_into_serial(x, y, d, &op)),
            _ => zip_into_serial(a, b, dst, &op),
        }
    }
    // SAFETY: every one of the first n slots was written above.
    unsafe { out.set_len(n) };
    out
}

/// Calls `f(first_row, rows)` on pieces of `data` made of whole rows of `row` elements, on rayon's threads when
/// `data` is long enough. The broadcast loop nests (`crate::zip`) split this way along their outermost dimension.
pub(crate) fn for_row_chunks<T: Send>(data: &mut [T], row: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let row = row.max(1);
    match chunk_len(data.len()) {
        #[cfg(feature = "rayon")]
        Some(c) if data.len() > row => {
            let rows = c.div_ceil(row);
            data.par_chunks_mut(rows * row)
                .enumerate()
                .for_each(|(k, piece)| f(k * rows, piece));
        }
        _ => f(0, data),
    }
}

/// `e^x` in f32 that auto-vectorises: Cody–Waite range reduction `x = n ln 2 + r`, |r| ≤ ln 2 / 2, Cephes'
/// degree-7 polynomial for `e^r` (≤ 1 ulp on that range), and `2^n` applied as two power-of-two factors so
/// results down to the smallest subnormal come out right. `+∞` above ln(f32::MAX), `0` below ln of the
/// smallest subnormal, NaN for NaN — as libm's `expf`, which it replaces in the sigmoid only (see `ops::unary::exp` for why).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const HI: f32 = 88.722_84; // ln(f32::MAX)
    const LO: f32 = -103.972_08; // ln of the smallest subnormal / 2
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4; // ln 2, high part (exact in few bits)
    const C2: f32 = -2.121_944_4e-4; // ln 2 − C1
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer kept in the low mantissa bits
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + SHIFT;
    let n = t - SHIFT;
    let i = t.to_bits() as i32 - SHIFT.to_bits() as i32;
    let r = xc - n * C1;
    let r = r - n * C2;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * (r * r) + r + 1.0;
    let i1 = i >> 1;
    let i2 = i - i1;
    let s1 = f32::from_bits(((i1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((i2 + 127) as u32) << 23);
    let y = e * s1 * s2;
    let y = if x > HI { f32::INFINITY } else { y };
    let y = if x < LO { 0.0 } else { y };
    if x.is_nan() { x } else { y }
}
