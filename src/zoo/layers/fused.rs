//! Row-wise and element-wise fused ops on burn-flex (f32) with their own backward: RMSNorm, SwiGLU's gate
//! (silu(gate) · up) and RoPE.
//!
//! Why: burn's autodiff runs RMSNorm as seven full-size ops (cast, square, mean, add, sqrt, divide, scale),
//! SwiGLU's gate as three (sigmoid, multiply, multiply) and RoPE as five (neg, cat, two products, add), each a pass
//! over the activations that allocates its output, with backward chains twice as long; here each is one pass
//! forward and one backward. Inner and autodiff
//! paths run the same kernel (a frozen reference reproduces its policy). Other devices and dtypes (bf16 inside an
//! autocast scope) keep burn's ops: the functions return `None` and the caller falls back.
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::cpu::{bthd_view, lanes, row_major, unit_rows, widest};

/// Rows per rayon task (and per partial sum of RMSNorm's weight gradient: a fixed count, so fixed bits).
const ROWS: usize = 16;
/// Elements per rayon task of the element-wise op.
const ELEMS: usize = 1 << 15;

/// A fused op of two float inputs, one output.
trait Fused2: Backward<Flex, 2> + Clone + Sized {
    /// What the forward leaves for the backward besides the inputs.
    type Saved;
    fn forward(&self, a: &[f32], b: &[f32], a_shape: &Shape) -> (Vec<f32>, Self::Saved);
    fn state(&self, ids: [NodeId; 2], saved: Self::Saved) -> Self::State;
}

/// `op` on two f32 tensors on burn-flex (inner or autodiff), else `None`.
fn apply2<O: Fused2, const DA: usize, const DB: usize>(
    op: O,
    a: &Tensor<DA>,
    b: &Tensor<DB>,
) -> Option<Tensor<DA>> {
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return None;
    }
    if let (Ok(x), Ok(y)) = (
        a.clone().try_into_primitive::<Flex>(),
        b.clone().try_into_primitive::<Flex>(),
    ) {
        return Some(Tensor::from_primitive::<Flex>(run(&op, &x, &y).0));
    }
    tracked2::<O, NoCheckpointing, DA, DB>(op.clone(), a, b)
        .or_else(|| tracked2::<O, BalancedCheckpointing, DA, DB>(op, a, b))
}

/// The forward on two flex tensors: the output in `a`'s shape and the saved state.
fn run<O: Fused2>(op: &O, a: &FlexTensor, b: &FlexTensor) -> (FlexTensor, O::Saved) {
    let shape = a.layout().shape().clone();
    let (xa, xb) = (row_major(a), row_major(b));
    let (out, saved) = op.forward(&xa, &xb, &shape);
    (FlexTensor::from_data(TensorData::new(out, shape)), saved)
}

fn tracked2<O: Fused2, C: CheckpointStrategy, const DA: usize, const DB: usize>(
    op: O,
    a: &Tensor<DA>,
    b: &Tensor<DB>,
) -> Option<Tensor<DA>>
where
    burn::backend::DispatchTensor: burn::backend::DispatchKindConversion<Autodiff<Flex, C>>,
{
    // A tensor outside the autodiff context (an input built on the inner device) is a constant here.
    let a = a.clone().try_into_primitive::<Autodiff<Flex, C>>().ok()?;
    let b = b.clone().try_into_primitive::<Autodiff<Flex, C>>().ok()?;
    let out: FloatTensor<Autodiff<Flex, C>> = match op
        .clone()
        .prepare::<C>([a.node(), b.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let ids = [prep.checkpoint(&a), prep.checkpoint(&b)];
            let (out, saved) = run(&op, a.primitive(), b.primitive());
            prep.finish(op.state(ids, saved), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(run(&op, a.primitive(), b.primitive()).0),
    };
    Some(Tensor::from_primitive::<Autodiff<Flex, C>>(out))
}

fn flex(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm over the last dim, `γ · (x / √(mean(x²) + ε))` (transformers' `LlamaRMSNorm` in f32), for x [.., d]
/// and γ [d] f32 on burn-flex; gradients for both. `None` elsewhere.
pub fn rms_norm<const D: usize>(x: &Tensor<D>, gamma: &Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    if x.dims()[D - 1] != gamma.dims()[0] {
        return None;
    }
    apply2(RmsNormOp { eps: eps as f32 }, x, gamma)
}

#[derive(Debug, Clone)]
struct RmsNormOp {
    eps: f32,
}

#[derive(Debug, Clone)]
struct RmsState {
    ids: [NodeId; 2],
    /// 1 / √(mean(x²) + ε) per row.
    rstd: Vec<f32>,
}

widest! {
    /// One row: y = γ · (x · r), r = 1 / √(mean(x²) + ε); returns r.
    fn rms_row(x: &[f32], g: &[f32], y: &mut [f32], eps: f32) -> f32 {
        let ss = lanes(x, 0.0, |a, v| a + v * v, |a, b| a + b);
        let r = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((y, &x), &g) in y.iter_mut().zip(x).zip(g) {
            *y = g * (x * r);
        }
        r
    }
}

widest! {
    /// One row's gradients: dx = r · (dy·γ − x · r² · mean(dy·γ·x)) into `dx`, and dγ += dy · x · r.
    fn rms_row_grad(x: &[f32], g: &[f32], dy: &[f32], r: f32, dx: Option<&mut [f32]>, dg: &mut [f32]) {
        if let Some(dx) = dx {
            let dot = lanes_dot3(dy, g, x);
            let c = r * r * (dot / x.len() as f32);
            for (((dx, &x), &g), &dy) in dx.iter_mut().zip(x).zip(g).zip(dy) {
                *dx = r * (dy * g - x * c);
            }
        }
        for ((dg, &x), &dy) in dg.iter_mut().zip(x).zip(dy) {
            *dg += dy * (x * r);
        }
    }
}

/// Σ a·b·c over 16 lanes (as `lanes`, three inputs).
#[inline(always)]
fn lanes_dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let n = a.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        for l in 0..16 {
            acc[l] += a[i + l] * b[i + l] * c[i + l];
        }
    }
    for i in n..a.len() {
        acc[i - n] += a[i] * b[i] * c[i];
    }
    acc.into_iter().fold(0.0, |s, v| s + v)
}

impl Fused2 for RmsNormOp {
    type Saved = Vec<f32>;

    fn forward(&self, x: &[f32], g: &[f32], _: &Shape) -> (Vec<f32>, Vec<f32>) {
        let d = g.len();
        let rows = x.len() / d.max(1);
        let mut y = vec![0.0f32; x.len()];
        let mut rstd = vec![0.0f32; rows];
        y.par_chunks_mut(d * ROWS)
            .zip(rstd.par_chunks_mut(ROWS))
            .enumerate()
            .for_each(|(c, (y, r))| {
                for (i, (y, r)) in y.chunks_mut(d).zip(r.iter_mut()).enumerate() {
                    let row = (c * ROWS + i) * d;
                    *r = rms_row(&x[row..row + d], g, y, self.eps);
                }
            });
        (y, rstd)
    }

    fn state(&self, ids: [NodeId; 2], rstd: Vec<f32>) -> RmsState {
        RmsState { ids, rstd }
    }
}

impl Backward<Flex, 2> for RmsNormOp {
    type State = RmsState;

    fn backward(self, ops: Ops<RmsState, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [nx, ng] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let x = ckpt.retrieve_node_output::<FlexTensor>(s.ids[0]);
        let g = ckpt.retrieve_node_output::<FlexTensor>(s.ids[1]);
        let (shape, gshape) = (x.layout().shape().clone(), g.layout().shape().clone());
        let (xs, gs, dys) = (row_major(&x), row_major(&g), row_major(&dy));
        let d = gs.len();
        let chunks = s.rstd.len().div_ceil(ROWS);
        let mut dx = nx.is_some().then(|| vec![0.0f32; xs.len()]);
        // partial dγ per chunk of rows, added in chunk order below
        let mut dg = vec![0.0f32; chunks * d];
        let work = |c: usize, dx: Option<&mut [f32]>, dg: &mut [f32]| {
            let mut dx = dx;
            for i in 0..ROWS.min(s.rstd.len() - c * ROWS) {
                let r = c * ROWS + i;
                let row = r * d..(r + 1) * d;
                let dxr = dx.as_deref_mut().map(|v| &mut v[i * d..(i + 1) * d]);
                rms_row_grad(&xs[row.clone()], &gs, &dys[row], s.rstd[r], dxr, dg);
            }
        };
        match dx.as_mut() {
            Some(dx) => dx
                .par_chunks_mut(d * ROWS)
                .zip(dg.par_chunks_mut(d))
                .enumerate()
                .for_each(|(c, (dx, dg))| work(c, Some(dx), dg)),
            None => dg
                .par_chunks_mut(d)
                .enumerate()
                .for_each(|(c, dg)| work(c, None, dg)),
        }
        if let (Some(node), Some(dx)) = (nx, dx) {
            grads.register::<Flex>(node.id, flex(dx, shape));
        }
        if let Some(node) = ng {
            let mut total = dg[..d].to_vec();
            for p in dg.chunks(d).skip(1) {
                for (t, &v) in total.iter_mut().zip(p) {
                    *t += v;
                }
            }
            grads.register::<Flex>(node.id, flex(total, gshape));
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU

/// silu(gate) · up for two f32 tensors of one shape on burn-flex, with gradients for both. `None` elsewhere.
pub fn swiglu<const D: usize>(gate: &Tensor<D>, up: &Tensor<D>) -> Option<Tensor<D>> {
    if gate.dims() != up.dims() {
        return None;
    }
    apply2(SwigluOp, gate, up)
}

#[derive(Debug, Clone)]
struct SwigluOp;

/// σ(a) = 1 / (1 + e^−a) on the vectorising exp (e^−a = +∞ for a very negative gives 0, as it should).
#[inline(always)]
fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + burn_flex::exp_f32(-a))
}

widest! {
    fn swiglu_chunk(a: &[f32], b: &[f32], h: &mut [f32]) {
        for ((h, &a), &b) in h.iter_mut().zip(a).zip(b) {
            *h = a * sigmoid(a) * b;
        }
    }
}

widest! {
    /// da = dh · b · σ(a)(1 + a(1 − σ(a))), db = dh · a · σ(a).
    fn swiglu_chunk_grad(a: &[f32], b: &[f32], dh: &[f32], da: &mut [f32], db: &mut [f32]) {
        for ((((da, db), &a), &b), &dh) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(dh) {
            let s = sigmoid(a);
            *da = dh * b * (s * (1.0 + a * (1.0 - s)));
            *db = dh * (a * s);
        }
    }
}

impl Fused2 for SwigluOp {
    type Saved = ();

    fn forward(&self, a: &[f32], b: &[f32], _: &Shape) -> (Vec<f32>, ()) {
        let mut h = vec![0.0f32; a.len()];
        h.par_chunks_mut(ELEMS)
            .zip(a.par_chunks(ELEMS).zip(b.par_chunks(ELEMS)))
            .for_each(|(h, (a, b))| swiglu_chunk(a, b, h));
        (h, ())
    }

    fn state(&self, ids: [NodeId; 2], _: ()) -> [NodeId; 2] {
        ids
    }
}

impl Backward<Flex, 2> for SwigluOp {
    type State = [NodeId; 2];

    fn backward(self, ops: Ops<[NodeId; 2], 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [na, nb] = ops.parents;
        let dh = grads.consume::<Flex>(&ops.node);
        let a = ckpt.retrieve_node_output::<FlexTensor>(ops.state[0]);
        let b = ckpt.retrieve_node_output::<FlexTensor>(ops.state[1]);
        let shape = a.layout().shape().clone();
        let (av, bv, dhv) = (row_major(&a), row_major(&b), row_major(&dh));
        let (mut da, mut db) = (vec![0.0f32; av.len()], vec![0.0f32; av.len()]);
        da.par_chunks_mut(ELEMS)
            .zip(db.par_chunks_mut(ELEMS))
            .enumerate()
            .for_each(|(c, (da, db))| {
                let r = c * ELEMS..c * ELEMS + da.len();
                swiglu_chunk_grad(&av[r.clone()], &bv[r.clone()], &dhv[r], da, db);
            });
        if let Some(node) = na {
            grads.register::<Flex>(node.id, flex(da, shape.clone()));
        }
        if let Some(node) = nb {
            grads.register::<Flex>(node.id, flex(db, shape));
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// RoPE

/// Rotary embedding in transformers' `rotate_half` convention, `x · cos + rotate_half(x) · sin` with
/// rotate_half(x) = [−x₂, x₁], for x [b, h, t, d] (any strides) and tables [b or 1, 1, t, d], f32 on burn-flex;
/// the gradient of x (the tables are constants). The result is laid out [b, t, h, d] in memory (a [b, h, t, d]
/// view), so the attention output's swap back and merge of heads, and the gradient's, cost no copy. The same
/// operations in the same order as `rope::apply`'s burn ops: the same bits. `None` elsewhere.
pub fn rope(x: &Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Option<Tensor<4>> {
    let [b, _, t, d] = x.dims();
    let ok = |m: &Tensor<4>| {
        let [mb, mh, mt, md] = m.dims();
        (mb == b || mb == 1) && mh == 1 && mt == t && md == d && m.dtype() == DType::F32
    };
    if x.dtype() != DType::F32 || d % 2 != 0 || !ok(cos) || !ok(sin) {
        return None;
    }
    let tables = |m: &Tensor<4>| {
        m.clone()
            .try_into_primitive::<Flex>()
            .or_else(|_| {
                m.clone()
                    .try_into_primitive::<Autodiff<Flex>>()
                    .map(|a| a.into_primitive())
            })
            .or_else(|_| {
                m.clone()
                    .try_into_primitive::<Autodiff<Flex, BalancedCheckpointing>>()
                    .map(|a| a.into_primitive())
            })
            .ok()
    };
    let (cos, sin) = (tables(cos)?, tables(sin)?);
    if let Ok(x) = x.clone().try_into_primitive::<Flex>() {
        return Some(Tensor::from_primitive::<Flex>(rotate(
            &x, &cos, &sin, false,
        )));
    }
    rope_tracked::<NoCheckpointing>(x, &cos, &sin)
        .or_else(|| rope_tracked::<BalancedCheckpointing>(x, &cos, &sin))
}

fn rope_tracked<C: CheckpointStrategy>(
    x: &Tensor<4>,
    cos: &FlexTensor,
    sin: &FlexTensor,
) -> Option<Tensor<4>>
where
    burn::backend::DispatchTensor: burn::backend::DispatchKindConversion<Autodiff<Flex, C>>,
{
    let x = x.clone().try_into_primitive::<Autodiff<Flex, C>>().ok()?;
    let out: FloatTensor<Autodiff<Flex, C>> =
        match RopeOp.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = rotate(x.primitive(), cos, sin, false);
                prep.finish((cos.clone(), sin.clone()), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(rotate(x.primitive(), cos, sin, false)),
        };
    Some(Tensor::from_primitive::<Autodiff<Flex, C>>(out))
}

#[derive(Debug)]
struct RopeOp;

impl Backward<Flex, 1> for RopeOp {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (cos, sin) = ops.state;
        if let Some(node) = node {
            grads.register::<Flex>(node.id, rotate(&dy, &cos, &sin, true));
        }
    }
}

widest! {
    /// One row (d = 2·half): forward y₁ = x₁c₁ + (−x₂)s₁, y₂ = x₂c₂ + x₁s₂; backward (the transpose)
    /// dx₁ = dy₁c₁ + dy₂s₂, dx₂ = dy₂c₂ + (−(dy₁s₁)) — burn's chain's operations in its order.
    fn rotate_row(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32], back: bool) {
        let half = x.len() / 2;
        let (x1, x2) = x.split_at(half);
        let (c1, c2) = c.split_at(half);
        let (s1, s2) = s.split_at(half);
        let (y1, y2) = y.split_at_mut(half);
        if back {
            for i in 0..half {
                y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                y2[i] = x2[i] * c2[i] + -(x1[i] * s1[i]);
            }
        } else {
            for i in 0..half {
                y1[i] = x1[i] * c1[i] + -x2[i] * s1[i];
                y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
            }
        }
    }
}

/// The rotation (or its transpose, `back`) of x [b, h, t, d] into [b, t, h, d] memory.
fn rotate(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor, back: bool) -> FlexTensor {
    let (x, cos, sin) = (unit_rows(x), unit_rows(cos), unit_rows(sin));
    let sh = x.layout().shape();
    let [b, h, t, d] = [sh[0], sh[1], sh[2], sh[3]];
    let at = |m: &FlexTensor, i: [usize; 3]| {
        let (l, dims) = (m.layout(), m.layout().shape());
        let s = l.strides();
        let mut off = l.start_offset() as isize;
        for (k, &i) in i.iter().enumerate() {
            if dims[k] > 1 {
                off += i as isize * s[k];
            }
        }
        off as usize
    };
    let (xd, cd, sd) = (
        x.storage::<f32>(),
        cos.storage::<f32>(),
        sin.storage::<f32>(),
    );
    let mut y = vec![0.0f32; b * t * h * d];
    y.par_chunks_mut(h * d).enumerate().for_each(|(bt, rows)| {
        let (bi, ti) = (bt / t, bt % t);
        let (co, so) = (at(&cos, [bi, 0, ti]), at(&sin, [bi, 0, ti]));
        for (hi, row) in rows.chunks_mut(d).enumerate() {
            let xo = at(&x, [bi, hi, ti]);
            rotate_row(&xd[xo..xo + d], &cd[co..co + d], &sd[so..so + d], row, back);
        }
    });
    bthd_view(y, [b, h, t, d])
}

#[cfg(test)]
mod tests {
    use super::super::cpu::assert_close;
    use super::super::to_vec;
    use burn::tensor::{Device, Distribution, Tensor, activation};

    fn close<const D: usize>(what: &str, want: Tensor<D>, got: Tensor<D>) {
        assert_close(what, want, got, 1e-6, 2e-5);
    }

    /// The fused RMSNorm and SwiGLU against burn's ops: outputs, and gradients of every input (including the
    /// norm's weight, summed over 37 rows: more than two partial-sum chunks and a ragged last one).
    #[test]
    fn fused_ops_match_burns() {
        let device = Device::flex().autodiff();
        device.seed(4);
        let x: Tensor<3> =
            Tensor::random([37, 1, 70], Distribution::Normal(0.0, 2.0), &device).require_grad();
        let gamma: Tensor<1> =
            (Tensor::random([70], Distribution::Default, &device) + 1.0).require_grad();
        let w: Tensor<3> = Tensor::random([37, 1, 70], Distribution::Default, &device);
        let fused = super::rms_norm(&x, &gamma, 1e-6).expect("flex f32");
        // burn's RmsNorm::forward
        let rms = (x.clone().square().mean_dim(2) + 1e-6).sqrt();
        let reference = (x.clone() / rms) * gamma.clone().unsqueeze::<3>();
        close("rms", reference.clone(), fused.clone());
        let gf = (fused * w.clone()).sum().backward();
        let gr = (reference * w.clone()).sum().backward();
        close("rms dx", x.grad(&gr).unwrap(), x.grad(&gf).unwrap());
        close("rms dγ", gamma.grad(&gr).unwrap(), gamma.grad(&gf).unwrap());

        let a: Tensor<3> =
            Tensor::random([3, 50_000, 1], Distribution::Normal(0.0, 4.0), &device).require_grad();
        let b: Tensor<3> =
            Tensor::random([3, 50_000, 1], Distribution::Default, &device).require_grad();
        let w: Tensor<3> = Tensor::random([3, 50_000, 1], Distribution::Default, &device);
        let fused = super::swiglu(&a, &b).expect("flex f32");
        let reference = activation::silu(a.clone()) * b.clone();
        close("swiglu", reference.clone(), fused.clone());
        let gf = (fused.clone() * w.clone()).sum().backward();
        let gr = (reference * w).sum().backward();
        close("swiglu da", a.grad(&gr).unwrap(), a.grad(&gf).unwrap());
        close("swiglu db", b.grad(&gr).unwrap(), b.grad(&gf).unwrap());
        // the inner backend runs the same kernel
        let inner = super::swiglu(&a.clone().inner(), &b.clone().inner()).unwrap();
        assert_eq!(to_vec(inner), to_vec(fused.inner()));
    }

    /// The fused rotation gives `rope::apply`'s burn ops' bits, forward and backward, on a strided x (the
    /// projections' [b, t, h, d] viewed [b, h, t, d]) with per-row tables and with tables shared by the batch.
    #[test]
    fn fused_rope_equals_burns_rotation() {
        let device = Device::flex().autodiff();
        device.seed(8);
        let (b, h, t, d) = (2, 3, 5, 8);
        let x: Tensor<4> = Tensor::random([b, t, h, d], Distribution::Default, &device)
            .swap_dims(1, 2)
            .require_grad();
        for tb in [b, 1] {
            let cos: Tensor<4> = Tensor::random([tb, 1, t, d], Distribution::Default, &device);
            let sin: Tensor<4> = Tensor::random([tb, 1, t, d], Distribution::Default, &device);
            let fused = super::rope(&x, &cos, &sin).expect("flex f32");
            let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
            let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
            let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
            let reference = x.clone() * cos.clone() + rotated * sin.clone();
            assert_eq!(to_vec(reference.clone()), to_vec(fused.clone()), "forward");
            let w: Tensor<4> = Tensor::random([b, h, t, d], Distribution::Default, &device);
            let gf = (fused * w.clone()).sum().backward();
            let gr = (reference * w).sum().backward();
            assert_eq!(
                to_vec(x.grad(&gr).unwrap()),
                to_vec(x.grad(&gf).unwrap()),
                "backward"
            );
        }
    }
}
