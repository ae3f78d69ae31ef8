//! Helpers shared by the fused CPU kernels on burn-flex tensors (`flash`: attention, `logprob`: log-softmax at
//! the targets, `fused`: RMSNorm, SwiGLU, RoPE; `stages::adamw`'s update): reading a tensor's storage in place, writing disjoint parts of one buffer from rayon tasks, and
//! compiling a hot loop for the widest vectors the CPU has.
use burn::tensor::{Shape, TensorData};
use burn_flex::{FlexTensor, Layout};

/// `t` itself when its strides are non-negative (the kernels read any such layout), else a contiguous copy.
pub fn readable(t: &FlexTensor) -> std::borrow::Cow<'_, FlexTensor> {
    if t.layout().has_positive_strides() {
        std::borrow::Cow::Borrowed(t)
    } else {
        std::borrow::Cow::Owned(t.to_contiguous())
    }
}

/// A 4-D `t` itself when its last dim has unit stride and no stride is negative, else a contiguous copy.
pub fn unit_rows(t: &FlexTensor) -> std::borrow::Cow<'_, FlexTensor> {
    let l = t.layout();
    if l.strides()[3] == 1 && l.has_positive_strides() {
        std::borrow::Cow::Borrowed(t)
    } else {
        std::borrow::Cow::Owned(t.to_contiguous())
    }
}

/// A flex tensor's f32 elements in row-major order: borrowed when it is contiguous from its offset, else a copy.
pub fn row_major(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("contiguous")
                .to_vec(),
        ),
    }
}

/// A raw pointer handed to rayon tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub struct Out(pub *mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The buffer's element `offset` (a method, so closures capture the wrapper rather than its raw field).
    pub fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// Runs `$body` compiled for AVX-512 or AVX2+FMA when the CPU has them (the same Rust, so the same bits: Rust
/// never contracts `a * b + c` into an FMA), else for the baseline.
macro_rules! widest {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn plain($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { plain($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { plain($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    return unsafe { v3($($arg),*) };
                }
            }
            plain($($arg),*)
        }
    };
}

/// A reduction over 16 interleaved accumulators (one AVX-512 register; a single running value would keep the
/// loop scalar, as float addition does not reassociate): `f(acc, x)` folds each element into its lane, then
/// `combine` folds the lanes, in a fixed order, so fixed bits.
#[inline(always)]
pub fn lanes(
    s: &[f32],
    init: f32,
    f: impl Fn(f32, f32) -> f32,
    combine: impl Fn(f32, f32) -> f32,
) -> f32 {
    let mut acc = [init; 16];
    let mut chunks = s.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    for (i, &x) in chunks.remainder().iter().enumerate() {
        acc[i] = f(acc[i], x);
    }
    acc.into_iter().fold(init, combine)
}

/// max(a, x) as one vector instruction (the kernels' inputs hold no NaN; −∞ is the identity).
#[inline(always)]
pub fn max_of(a: f32, x: f32) -> f32 {
    if x > a { x } else { a }
}

/// A [b, h, t, d] view over a buffer laid out [b, t, h, d].
pub fn bthd_view(buf: Vec<f32>, [b, h, t, d]: [usize; 4]) -> FlexTensor {
    let (bytes, _, dtype) = TensorData::new(buf, [b * t * h * d]).into_parts();
    let layout = Layout::new(
        Shape::new([b, h, t, d]),
        vec![(t * h * d) as isize, d as isize, (h * d) as isize, 1],
        0,
    );
    FlexTensor::new(bytes, layout, dtype)
}

pub(crate) use widest;

/// Test helper: `got` equals `want` within `abs + rel·|want|` element-wise, and `want` is not all (near) zero.
#[cfg(test)]
pub fn assert_close<const D: usize>(
    what: &str,
    want: burn::tensor::Tensor<D>,
    got: burn::tensor::Tensor<D>,
    abs: f32,
    rel: f32,
) {
    let (a, b) = (super::to_vec(want), super::to_vec(got));
    assert_eq!(a.len(), b.len(), "{what}");
    assert!(a.iter().any(|x| x.abs() > 1e-3), "{what}: all zero");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= abs + rel * x.abs(),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}
