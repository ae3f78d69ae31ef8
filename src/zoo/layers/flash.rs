//! Fused scaled-dot-product attention on burn-flex (f32), forward and backward, as one autodiff operation.
//!
//! Why: under autodiff burn runs attention as a chain of full-size ops (scores [b, h, tq, tk] materialised, mask
//! fill, a decomposed softmax, each result kept for backward) while inference runs flex's own fused kernel; the
//! chain cost about a quarter of a small-align training step, and the two paths differ in their last bits (a DPO
//! reference on the inner backend did not reproduce its policy under autodiff). Here both paths run one kernel.
//!
//! Algorithm (FlashAttention-2's, with whole key rows per block since a CPU block of 64 query rows × all keys fits
//! in cache): per (batch, head) and block of query rows, S = Q Kᵀ·scale over the keys up to the block's last
//! unmasked one (causal blocks skip the masked upper triangle), masked entries −∞, P = softmax(S), O = P V, and the
//! row log-sum-exp L is kept. Backward recomputes P = exp(S − L) per block and accumulates dV += Pᵀ dO,
//! dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K·scale, dK += dSᵀ Q·scale, so no [tq, tk] tensor outlives a block.
//! Grouped-query attention reads K/V head `i / (h / kv_heads)` for query head `i` (transformers' `repeat_kv`
//! order) without repeating them; backward runs one task per (batch, query head), each accumulating its own share of
//! dK/dV, and adds the shares of a KV head's group in head order afterwards (no locks, fixed bits).
//! Products run on `gemm` (the crate burn-flex uses), one thread per task; tasks spread over rayon's pool. Every
//! task sums in a fixed order, so results do not depend on the thread count.
//!
//! Layouts: inputs are read in place through their strides (the [b, t, h, d] → [b, h, t, d] swap of the
//! projections costs no copy); the output and the gradients are written [b, t, h, d] in memory and returned as
//! [b, h, t, d] views, so the caller's swap back and merge of heads are free.
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Bool, DType, Tensor};
use burn_flex::FlexTensor;
use gemm::{Parallelism, gemm};

use super::cpu::{Out, bthd_view, lanes, max_of, readable, unit_rows, widest};
use rayon::prelude::*;

/// Query rows per block: 64 rows × a few hundred keys of scores stay in L2 next to the K/V rows they read.
const BLOCK_Q: usize = 64;

/// softmax(q kᵀ / √d, masked) v on burn-flex f32 tensors, inner or autodiff (gradients for q, k and v).
/// q: [b, h, tq, d], k: [b, kvh, tk, d], v: [b, kvh, tk, dv] with h a multiple of kvh; mask (true = masked)
/// broadcastable to [b, h, tq, tk] with its last two dims full. Fully masked query rows give zeros (and zero
/// gradients). `None` when the tensors are not all f32 on burn-flex: the caller uses burn's attention then.
pub fn attend(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: Option<&Tensor<4, Bool>>,
) -> Option<Tensor<4>> {
    if [q.dtype(), k.dtype(), v.dtype()] != [DType::F32; 3] {
        return None;
    }
    let [b, h, tq, d] = q.dims();
    let [kb, kvh, tk, kd] = k.dims();
    let [vb, vh, vt, _] = v.dims();
    if kb != b || vb != b || kd != d || vh != kvh || vt != tk || kvh == 0 || h % kvh != 0 {
        return None;
    }
    if let Some(m) = mask {
        let [mb, mh, mq, mk] = m.dims();
        if (mb != 1 && mb != b) || (mh != 1 && mh != h) || mq != tq || mk != tk {
            return None;
        }
    }
    let scale = 1.0 / (d as f32).sqrt();
    if let (Ok(qp), Ok(kp), Ok(vp)) = (
        q.clone().try_into_primitive::<Flex>(),
        k.clone().try_into_primitive::<Flex>(),
        v.clone().try_into_primitive::<Flex>(),
    ) {
        let mask = match mask {
            Some(m) => Some(flex_mask(m)?),
            None => None,
        };
        let (o, _) = forward(&qp, &kp, &vp, mask.as_ref(), scale);
        return Some(Tensor::from_primitive::<Flex>(o));
    }
    tracked::<NoCheckpointing>(q, k, v, mask, scale)
        .or_else(|| tracked::<BalancedCheckpointing>(q, k, v, mask, scale))
}

/// The mask's burn-flex primitive, whichever context (inner or autodiff) it was made in.
fn flex_mask(mask: &Tensor<4, Bool>) -> Option<FlexTensor> {
    let m = mask.clone();
    m.clone()
        .try_into_primitive::<Flex>()
        .or_else(|_| m.clone().try_into_primitive::<Autodiff<Flex>>())
        .or_else(|_| m.try_into_primitive::<Autodiff<Flex, BalancedCheckpointing>>())
        .ok()
}

/// The autodiff operation under checkpoint strategy `C`; `None` when the tensors are not on `Autodiff<Flex, C>`.
fn tracked<C>(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: Option<&Tensor<4, Bool>>,
    scale: f32,
) -> Option<Tensor<4>>
where
    C: CheckpointStrategy,
    burn::backend::DispatchTensor: burn::backend::DispatchKindConversion<Autodiff<Flex, C>>,
{
    let q = q.clone().try_into_primitive::<Autodiff<Flex, C>>().ok()?;
    let k = k.clone().try_into_primitive::<Autodiff<Flex, C>>().ok()?;
    let v = v.clone().try_into_primitive::<Autodiff<Flex, C>>().ok()?;
    let mask = match mask {
        Some(m) => Some(flex_mask(m)?),
        None => None,
    };
    let out: FloatTensor<Autodiff<Flex, C>> = match FlashBackward
        .prepare::<C>([q.node(), k.node(), v.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let ids = [
                prep.checkpoint(&q),
                prep.checkpoint(&k),
                prep.checkpoint(&v),
            ];
            let (o, lse) = forward(
                q.primitive(),
                k.primitive(),
                v.primitive(),
                mask.as_ref(),
                scale,
            );
            prep.finish(
                FlashState {
                    ids,
                    o: o.clone(),
                    lse,
                    mask,
                    scale,
                },
                o,
            )
        }
        OpsKind::UnTracked(prep) => {
            let (o, _) = forward(
                q.primitive(),
                k.primitive(),
                v.primitive(),
                mask.as_ref(),
                scale,
            );
            prep.finish(o)
        }
    };
    Some(Tensor::from_primitive::<Autodiff<Flex, C>>(out))
}

#[derive(Debug)]
struct FlashBackward;

#[derive(Debug, Clone)]
struct FlashState {
    /// q, k, v in the checkpointer.
    ids: [NodeId; 3],
    /// The forward's output and row log-sum-exp [b, h, tq].
    o: FlexTensor,
    lse: Vec<f32>,
    mask: Option<FlexTensor>,
    scale: f32,
}

impl Backward<Flex, 3> for FlashBackward {
    type State = FlashState;

    fn backward(self, ops: Ops<FlashState, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [nq, nk, nv] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let q = ckpt.retrieve_node_output::<FlexTensor>(s.ids[0]);
        let k = ckpt.retrieve_node_output::<FlexTensor>(s.ids[1]);
        let v = ckpt.retrieve_node_output::<FlexTensor>(s.ids[2]);
        let (dq, dk, dv) = backward(&q, &k, &v, &s.o, &s.lse, &grad, s.mask.as_ref(), s.scale);
        for (node, g) in [(nq, dq), (nk, dk), (nv, dv)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// A 4-D tensor read in place: its storage, element offset and strides (in elements, non-negative).
struct View<'a, E> {
    data: &'a [E],
    offset: usize,
    strides: [isize; 4],
    dims: [usize; 4],
}

impl<E: bytemuck::Pod + burn::tensor::Element> View<'_, E> {
    fn of(t: &FlexTensor) -> View<'_, E> {
        let l = t.layout();
        let s = l.strides();
        let sh = l.shape();
        View {
            data: t.storage::<E>(),
            offset: l.start_offset(),
            strides: [s[0], s[1], s[2], s[3]],
            dims: [sh[0], sh[1], sh[2], sh[3]],
        }
    }

    /// Pointer to element [i0, i1, i2, 0].
    fn at(&self, i0: usize, i1: usize, i2: usize) -> *const E {
        let off = self.offset as isize
            + i0 as isize * self.strides[0]
            + i1 as isize * self.strides[1]
            + i2 as isize * self.strides[2];
        self.data[off as usize..].as_ptr()
    }
}

/// The mask's rows (u8 over keys, nonzero = masked), read in place, or a copy when its key axis is strided.
struct MaskRows<'a> {
    mask: Option<std::borrow::Cow<'a, FlexTensor>>,
}

impl<'a> MaskRows<'a> {
    fn new(mask: Option<&'a FlexTensor>) -> Self {
        MaskRows {
            mask: mask.map(unit_rows),
        }
    }

    /// Row `q` of (batch `b`, head `h`) over the first `tk` keys; `None` without a mask.
    fn row(&self, b: usize, h: usize, q: usize, tk: usize) -> Option<&[u8]> {
        let v = View::<u8>::of(self.mask.as_deref()?);
        let bi = if v.dims[0] == 1 { 0 } else { b };
        let hi = if v.dims[1] == 1 { 0 } else { h };
        let off = v.offset as isize
            + bi as isize * v.strides[0]
            + hi as isize * v.strides[1]
            + q as isize * v.strides[2];
        Some(&v.data[off as usize..off as usize + tk])
    }

    /// One past the last key any row of `rows` attends to (0: the block is fully masked).
    fn key_end(&self, b: usize, h: usize, rows: std::ops::Range<usize>, tk: usize) -> usize {
        if self.mask.is_none() {
            return tk;
        }
        let mut end = 0;
        for q in rows {
            let row = self.row(b, h, q, tk).unwrap();
            if let Some(last) = row[end..].iter().rposition(|&m| m == 0) {
                end += last + 1;
            }
        }
        end
    }
}

/// dst = beta · B · M for a block B (rows × keys, row stride `keys`) and the first `keys` rows of (batch, KV head)
/// of `m` (P V in the forward, dS K in the backward); dst rows `dst_rs` apart.
///
/// # Safety
/// `dst` must address rows × m's last dim elements at row stride `dst_rs`, written by no one else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn block_rows_product(
    dst: *mut f32,
    dst_rs: usize,
    block: &[f32],
    rows: usize,
    keys: usize,
    m: &View<f32>,
    [b, kvh]: [usize; 2],
    beta: f32,
) {
    assert!(block.len() >= rows * keys && keys <= m.dims[2]);
    unsafe {
        gemm(
            rows,
            m.dims[3],
            keys,
            dst,
            1,
            dst_rs as isize,
            false,
            block.as_ptr(),
            1,
            keys as isize,
            m.at(b, kvh, 0),
            m.strides[3],
            m.strides[2],
            0.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// S = Q Kᵀ · scale for query rows `rows` of (batch, head) against the first `keys` keys of the KV head:
/// `s` holds rows × keys (row stride `keys`). `[b, h, kv_head]` index the views.
fn block_scores(
    s: &mut [f32],
    q: &View<f32>,
    k: &View<f32>,
    [b, h, kvh]: [usize; 3],
    rows: std::ops::Range<usize>,
    keys: usize,
    scale: f32,
) {
    let (n, d) = (rows.len(), q.dims[3]);
    assert!(s.len() >= n * keys && rows.end <= q.dims[2] && keys <= k.dims[2]);
    // Safety: the views address rows of d elements inside their storage (`View::at` bounds the start; the rows
    // lie within the tensors' extents), and `s` holds n × keys elements.
    unsafe {
        gemm(
            n,
            keys,
            d,
            s.as_mut_ptr(),
            1,
            keys as isize,
            false,
            q.at(b, h, rows.start),
            q.strides[3],
            q.strides[2],
            k.at(b, kvh, 0),
            k.strides[2],
            k.strides[3],
            0.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

widest! {
    /// Row softmax in place over `s` (masked entries −∞ first); returns the log-sum-exp (−∞ for a fully masked
    /// row, which becomes zeros).
    fn softmax_row(s: &mut [f32], mask: Option<&[u8]>) -> f32 {
        if let Some(m) = mask {
            for (x, &m) in s.iter_mut().zip(m) {
                *x = if m != 0 { f32::NEG_INFINITY } else { *x };
            }
        }
        let max = lanes(s, f32::NEG_INFINITY, max_of, max_of);
        if max == f32::NEG_INFINITY {
            s.fill(0.0);
            return f32::NEG_INFINITY;
        }
        for x in s.iter_mut() {
            *x = burn_flex::exp_f32(*x - max);
        }
        let sum = lanes(s, 0.0, |a, x| a + x, |a, x| a + x);
        let inv = 1.0 / sum;
        for x in s.iter_mut() {
            *x *= inv;
        }
        max + sum.ln()
    }
}

widest! {
    /// Backward's probabilities: p = exp(s − lse), 0 where masked or where the row is fully masked.
    fn probs_row(s: &mut [f32], mask: Option<&[u8]>, lse: f32) {
        if lse == f32::NEG_INFINITY {
            s.fill(0.0);
            return;
        }
        for x in s.iter_mut() {
            *x = burn_flex::exp_f32(*x - lse);
        }
        if let Some(m) = mask {
            for (x, &m) in s.iter_mut().zip(m) {
                *x = if m != 0 { 0.0 } else { *x };
            }
        }
    }
}

widest! {
    /// dS = P ∘ (dP − D), in place over dP.
    fn dscores_row(dp: &mut [f32], p: &[f32], dsum: f32) {
        for (x, &p) in dp.iter_mut().zip(p) {
            *x = p * (*x - dsum);
        }
    }
}

/// Forward: the output [b, h, tq, dv] (a view over [b, tq, h, dv] memory) and the row log-sum-exp [b, h, tq].
fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    mask: Option<&FlexTensor>,
    scale: f32,
) -> (FlexTensor, Vec<f32>) {
    let ts = [q, k, v].map(readable);
    let [qv, kv, vv] = ts.each_ref().map(|t| View::<f32>::of(t));
    let masks = MaskRows::new(mask);
    let [b, h, tq, _] = qv.dims;
    let [_, kvh, tk, dv] = vv.dims;
    let g = h / kvh;
    let mut o = vec![0.0f32; b * tq * h * dv];
    let mut lse = vec![f32::NEG_INFINITY; b * h * tq];
    let out = Out(o.as_mut_ptr());
    lse.par_chunks_mut(tq.max(1))
        .enumerate()
        .for_each(|(bh, lse)| {
            let (bi, hi) = (bh / h, bh % h);
            let kvi = hi / g;
            let mut s = vec![0.0f32; BLOCK_Q.min(tq) * tk];
            for q0 in (0..tq).step_by(BLOCK_Q) {
                let rows = BLOCK_Q.min(tq - q0);
                let keys = masks.key_end(bi, hi, q0..q0 + rows, tk);
                if keys == 0 {
                    continue; // zeros and −∞ already there
                }
                let s = &mut s[..rows * keys];
                block_scores(s, &qv, &kv, [bi, hi, kvi], q0..q0 + rows, keys, scale);
                for (r, row) in s.chunks_mut(keys).enumerate() {
                    let m = masks.row(bi, hi, q0 + r, tk).map(|m| &m[..keys]);
                    lse[q0 + r] = softmax_row(row, m);
                }
                // O rows of (bi, hi) in [b, tq, h, dv] memory: row stride h·dv.
                let dst = out.at(((bi * tq + q0) * h + hi) * dv);
                // Safety: `dst` starts (bi, hi)'s rows q0.. of the [b, tq, h, dv] output, which this task alone writes.
                unsafe { block_rows_product(dst, h * dv, s, rows, keys, &vv, [bi, kvi], 1.0) };
            }
        });
    (bthd_view(o, [b, h, tq, dv]), lse)
}

/// Backward: (dq [b, h, tq, d], dk [b, kvh, tk, d], dv [b, kvh, tk, dv]), each a view over [b, t, heads, ·] memory.
#[allow(clippy::too_many_arguments)]
fn backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    o: &FlexTensor,
    lse: &[f32],
    grad: &FlexTensor,
    mask: Option<&FlexTensor>,
    scale: f32,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let ts = [q, k, v, o, grad].map(readable);
    let [qv, kv, vv, ov, gv] = ts.each_ref().map(|t| View::<f32>::of(t));
    let masks = MaskRows::new(mask);
    let [b, h, tq, d] = qv.dims;
    let [_, kvh, tk, dvd] = vv.dims;
    let g = h / kvh;
    let mut dq = vec![0.0f32; b * tq * h * d];
    let dq_out = Out(dq.as_mut_ptr());
    // Each query head's share of dK and dV ([b, h, tk, ·]), added per KV head below in head order: one task per
    // (batch, query head) keeps every core busy at batch 1 with few KV heads, and the bits fixed.
    let mut part_k = vec![0.0f32; b * h * tk * d];
    let mut part_v = vec![0.0f32; b * h * tk * dvd];
    let pieces = part_k
        .par_chunks_mut((tk * d).max(1))
        .zip(part_v.par_chunks_mut((tk * dvd).max(1)));
    pieces.enumerate().for_each(|(task, (part_k, part_v))| {
        let (bi, hi) = (task / h, task % h);
        let kvi = hi / g;
        let block = BLOCK_Q.min(tq) * tk;
        let (mut p, mut dp) = (vec![0.0f32; block], vec![0.0f32; block]);
        let mut dsum = vec![0.0f32; BLOCK_Q];
        // this head's dK, dV rows: [tk, ·]
        let (dk_at, dv_at) = (part_k.as_mut_ptr(), part_v.as_mut_ptr());
        {
            let lse = &lse[(bi * h + hi) * tq..(bi * h + hi + 1) * tq];
            for q0 in (0..tq).step_by(BLOCK_Q) {
                let rows = BLOCK_Q.min(tq - q0);
                let keys = masks.key_end(bi, hi, q0..q0 + rows, tk);
                if keys == 0 {
                    continue;
                }
                let (p, dp) = (&mut p[..rows * keys], &mut dp[..rows * keys]);
                let q_at = qv.at(bi, hi, q0);
                let qs = [qv.strides[2], qv.strides[3]];
                let g_at = gv.at(bi, hi, q0);
                block_scores(p, &qv, &kv, [bi, hi, kvi], q0..q0 + rows, keys, scale);
                for (r, row) in p.chunks_mut(keys).enumerate() {
                    let m = masks.row(bi, hi, q0 + r, tk).map(|m| &m[..keys]);
                    probs_row(row, m, lse[q0 + r]);
                }
                // D = rowsum(dO ∘ O)
                for (r, ds) in dsum[..rows].iter_mut().enumerate() {
                    let (go, oo) = (gv.at(bi, hi, q0 + r), ov.at(bi, hi, q0 + r));
                    let mut acc = 0.0f32;
                    for c in 0..dvd {
                        unsafe {
                            acc += *go.offset(c as isize * gv.strides[3])
                                * *oo.offset(c as isize * ov.strides[3]);
                        }
                    }
                    *ds = acc;
                }
                unsafe {
                    // dV[keys] += Pᵀ dO
                    gemm(
                        keys,
                        dvd,
                        rows,
                        dv_at,
                        1,
                        dvd as isize,
                        true,
                        p.as_ptr(),
                        keys as isize,
                        1,
                        g_at,
                        gv.strides[3],
                        gv.strides[2],
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    // dP = dO Vᵀ
                    gemm(
                        rows,
                        keys,
                        dvd,
                        dp.as_mut_ptr(),
                        1,
                        keys as isize,
                        false,
                        g_at,
                        gv.strides[3],
                        gv.strides[2],
                        vv.at(bi, kvi, 0),
                        vv.strides[2],
                        vv.strides[3],
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                for (r, (dpr, pr)) in dp.chunks_mut(keys).zip(p.chunks(keys)).enumerate() {
                    dscores_row(dpr, pr, dsum[r]);
                }
                // dQ rows = dS K · scale, into [b, tq, h, d] memory (this task's heads only)
                unsafe {
                    let dst = dq_out.at(((bi * tq + q0) * h + hi) * d);
                    block_rows_product(dst, h * d, dp, rows, keys, &kv, [bi, kvi], scale);
                    // dK[keys] += dSᵀ Q · scale
                    gemm(
                        keys,
                        d,
                        rows,
                        dk_at,
                        1,
                        d as isize,
                        true,
                        dp.as_ptr(),
                        keys as isize,
                        1,
                        q_at,
                        qs[1],
                        qs[0],
                        1.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        }
    });
    (
        bthd_view(dq, [b, h, tq, d]),
        bthd_view(sum_heads(&part_k, [b, h, kvh, tk, d]), [b, kvh, tk, d]),
        bthd_view(sum_heads(&part_v, [b, h, kvh, tk, dvd]), [b, kvh, tk, dvd]),
    )
}

/// Per-query-head parts [b, h, tk, c] summed over each KV head's group, in head order, into [b, tk, kvh, c] memory.
fn sum_heads(parts: &[f32], [b, h, kvh, tk, c]: [usize; 5]) -> Vec<f32> {
    let g = h / kvh;
    let mut out = vec![0.0f32; b * tk * kvh * c];
    out.par_chunks_mut((kvh * c).max(1))
        .enumerate()
        .for_each(|(bt, row)| {
            let (bi, ti) = (bt / tk, bt % tk);
            for (kvi, dst) in row.chunks_mut(c).enumerate() {
                for hi in kvi * g..(kvi + 1) * g {
                    let src = &parts[((bi * h + hi) * tk + ti) * c..][..c];
                    for (o, &x) in dst.iter_mut().zip(src) {
                        *o += x;
                    }
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::super::attention::{build_mask, burn_attend, repeat_kv};
    use super::super::cpu::assert_close;
    use super::super::to_vec;
    use burn::tensor::{Device, Distribution, Tensor};

    fn close<const D: usize>(what: &str, want: Tensor<D>, got: Tensor<D>) {
        assert_close(what, want, got, 2e-6, 1e-5);
    }

    /// Random [b, t, heads, d] projections viewed as [b, heads, t, d] (strided, as the models make them).
    fn heads(b: usize, t: usize, n: usize, d: usize, device: &Device) -> Tensor<4> {
        Tensor::<4>::random([b, t, n, d], Distribution::Normal(0.0, 1.0), device)
            .swap_dims(1, 2)
            .require_grad()
    }

    /// The fused kernel against burn's materialised attention on repeated K/V heads: outputs and the gradients of
    /// q, k and v, for causal masks over several query blocks, a left-padded row (its first queries fully masked),
    /// packed segments, a KV-cache offset (fewer queries than keys) and no mask.
    #[test]
    fn fused_attention_matches_burns_forward_and_backward() {
        let device = Device::flex().autodiff();
        device.seed(11);
        let (b, h, kvh, d) = (2, 6, 2, 16);
        for (tq, tk, causal, segments) in [
            (150, 150, true, false),
            (70, 70, true, true),
            (5, 133, true, false),
            (40, 40, false, false),
        ] {
            let q = heads(b, tq, h, d, &device);
            let k = heads(b, tk, kvh, d, &device);
            let v = heads(b, tk, kvh, d, &device);
            let mut valid = vec![vec![true; tk]; b];
            valid[1][..7].iter_mut().for_each(|x| *x = false);
            let seg: Vec<Vec<u32>> = (0..b)
                .map(|_| (0..tk).map(|i| (i * 3 / tk) as u32).collect())
                .collect();
            let mask = (causal || segments)
                .then(|| build_mask(&valid, tq, causal, segments.then_some(&seg[..]), &device));
            let what = format!("tq {tq} tk {tk} causal {causal} segments {segments}");
            let fused = super::attend(&q, &k, &v, mask.as_ref()).expect("flex f32");
            let reference = burn_attend(
                q.clone(),
                repeat_kv(k.clone(), h / kvh),
                repeat_kv(v.clone(), h / kvh),
                mask.as_ref(),
            );
            close(&format!("{what}: output"), reference.clone(), fused.clone());
            let w = Tensor::<4>::random(fused.dims(), Distribution::Default, &device);
            let gf = (fused.clone() * w.clone()).sum().backward();
            let gr = (reference * w).sum().backward();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                close(
                    &format!("{what}: d{name}"),
                    x.grad(&gr).unwrap(),
                    x.grad(&gf).unwrap(),
                );
            }
            // The inner backend (a frozen reference model's path) runs the same kernel: the same bits.
            let inner = super::attend(
                &q.clone().inner(),
                &k.clone().inner(),
                &v.clone().inner(),
                mask.as_ref().map(|m| m.clone().inner()).as_ref(),
            )
            .unwrap();
            assert_eq!(
                to_vec(inner),
                to_vec(fused.inner()),
                "{what}: inner vs autodiff"
            );
        }
    }

    /// Work spread over rayon's threads sums in the same order as on one thread.
    #[test]
    fn fused_attention_does_not_depend_on_the_thread_count() {
        let device = Device::flex().autodiff();
        device.seed(5);
        let (q, k, v) = (
            heads(3, 90, 4, 8, &device),
            heads(3, 90, 2, 8, &device),
            heads(3, 90, 2, 8, &device),
        );
        let mask = build_mask(&vec![vec![true; 90]; 3], 90, true, None, &device);
        let run = || {
            let o = super::attend(&q, &k, &v, Some(&mask)).unwrap();
            let g = (o.clone() * o.clone()).sum().backward();
            let mut all = to_vec(o);
            for x in [&q, &k, &v] {
                all.extend(to_vec(x.grad(&g).unwrap()));
            }
            all
        };
        let many = run();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(many, one);
    }
}
