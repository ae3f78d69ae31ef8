//! Log-probability of each row's target under softmax, log softmax(logits)[target], fused on burn-flex (f32) with
//! its own backward.
//!
//! Why: the LM head's logits over the vocabulary ([supervised tokens × 32000] in a LLaVA stage, 64 MB per 500
//! tokens) are the step's largest tensors, and burn's log-softmax under autodiff runs as a chain of full-size ops
//! (max, subtract, exp, sum, log, subtract, gather; backward a scatter into zeros and the chain's gradients), each
//! allocating a fresh buffer above glibc's mmap threshold. Here the forward reads the logits once and keeps only
//! the row log-sum-exp; the backward writes p − onehot, scaled by the incoming gradient, once — into the logits'
//! own buffer when nothing else holds it, so the [tokens × vocab] gradient never exists beside the logits.
//! Inner and autodiff paths run the same kernel, so a frozen reference (DPO, PPO, GRPO) and its policy agree to
//! the bit.
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::cpu::{Out, lanes, max_of, row_major, widest};

/// Rows per rayon task: a few rows of 32K logits is enough work to amortise a task.
const ROWS_PER_TASK: usize = 4;

/// log softmax(logits)[r, targets[r]] for logits [n, v] (f32 on burn-flex, inner or autodiff): [n], with the
/// gradient of the logits under autodiff. `None` on other devices and dtypes or for a target outside the
/// vocabulary: the caller uses burn's log-softmax then.
pub fn target_logprobs(logits: &Tensor<2>, targets: &[i64]) -> Option<Tensor<1>> {
    let [n, v] = logits.dims();
    if logits.dtype() != DType::F32 || targets.len() != n {
        return None;
    }
    let targets: Vec<usize> = targets
        .iter()
        .map(|&t| usize::try_from(t).ok().filter(|&t| t < v))
        .collect::<Option<_>>()?;
    if let Ok(x) = logits.clone().try_into_primitive::<Flex>() {
        let (out, _) = forward(&x, &targets);
        return Some(Tensor::from_primitive::<Flex>(out));
    }
    tracked::<NoCheckpointing>(logits, &targets)
        .or_else(|| tracked::<BalancedCheckpointing>(logits, &targets))
}

fn tracked<C: CheckpointStrategy>(logits: &Tensor<2>, targets: &[usize]) -> Option<Tensor<1>>
where
    burn::backend::DispatchTensor: burn::backend::DispatchKindConversion<Autodiff<Flex, C>>,
{
    let x = logits
        .clone()
        .try_into_primitive::<Autodiff<Flex, C>>()
        .ok()?;
    let out: FloatTensor<Autodiff<Flex, C>> = match LogprobBackward
        .prepare::<C>([x.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let id = prep.checkpoint(&x);
            let (out, lse) = forward(x.primitive(), targets);
            let state = LogprobState {
                logits: id,
                lse,
                targets: targets.to_vec(),
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive(), targets).0),
    };
    Some(Tensor::from_primitive::<Autodiff<Flex, C>>(out))
}

#[derive(Debug)]
struct LogprobBackward;

#[derive(Debug, Clone)]
struct LogprobState {
    logits: NodeId,
    lse: Vec<f32>,
    targets: Vec<usize>,
}

impl Backward<Flex, 1> for LogprobBackward {
    type State = LogprobState;

    fn backward(self, ops: Ops<LogprobState, 1>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let logits = ckpt.retrieve_node_output::<FlexTensor>(s.logits);
        if let Some(node) = node {
            grads.register::<Flex>(node.id, backward(logits, &s.lse, &s.targets, &grad));
        }
    }
}

widest! {
    /// The row's log-sum-exp (max + ln Σ exp(x − max)).
    fn row_lse(x: &[f32]) -> f32 {
        let max = lanes(x, f32::NEG_INFINITY, max_of, max_of);
        if max == f32::NEG_INFINITY || max == f32::INFINITY || max.is_nan() {
            return max; // −∞ rows have no distribution; +∞ / NaN propagate as log-softmax would
        }
        let sum = lanes(x, 0.0, |a, y| a + burn_flex::exp_f32(y - max), |a, b| a + b);
        max + sum.ln()
    }
}

widest! {
    /// d logits of one row, over the row's logits: g · (onehot(target) − exp(x − lse)).
    fn row_grad(row: &mut [f32], lse: f32, target: usize, g: f32) {
        for y in row.iter_mut() {
            *y = -g * burn_flex::exp_f32(*y - lse);
        }
        row[target] += g;
    }
}

/// Forward: the target log-probs [n] and the row log-sum-exp.
fn forward(logits: &FlexTensor, targets: &[usize]) -> (FlexTensor, Vec<f32>) {
    let shape = logits.layout().shape();
    let (n, v) = (shape[0], shape[1]);
    let x = row_major(logits);
    let mut lse = vec![0.0f32; n];
    let mut out = vec![0.0f32; n];
    lse.par_chunks_mut(ROWS_PER_TASK)
        .zip(out.par_chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .for_each(|(c, (lse, out))| {
            for (i, (l, o)) in lse.iter_mut().zip(out.iter_mut()).enumerate() {
                let r = c * ROWS_PER_TASK + i;
                let row = &x[r * v..(r + 1) * v];
                *l = row_lse(row);
                *o = row[targets[r]] - *l;
            }
        });
    (FlexTensor::from_data(TensorData::new(out, [n])), lse)
}

/// Backward: d logits [n, v] for the incoming gradient [n], in the logits' buffer when it is held only here.
fn backward(
    mut logits: FlexTensor,
    lse: &[f32],
    targets: &[usize],
    grad: &FlexTensor,
) -> FlexTensor {
    let shape = logits.layout().shape().clone();
    let (n, v) = (shape[0], shape[1]);
    let g = row_major(grad).into_owned();
    let in_place = logits.layout().contiguous_offsets() == Some((0, n * v))
        && logits
            .try_storage_mut::<f32>()
            .is_some_and(|s| s.len() == n * v);
    if in_place {
        let data = logits.try_storage_mut::<f32>().expect("unique");
        data.par_chunks_mut(v * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, rows)| {
                for (i, row) in rows.chunks_mut(v).enumerate() {
                    let r = c * ROWS_PER_TASK + i;
                    row_grad(row, lse[r], targets[r], g[r]);
                }
            });
        return logits;
    }
    let x = row_major(&logits);
    let mut d = vec![0.0f32; n * v]; // calloc: fresh zero pages, written once below
    let dst = Out(d.as_mut_ptr());
    (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|c| {
            for r in c * ROWS_PER_TASK..((c + 1) * ROWS_PER_TASK).min(n) {
                let row = unsafe { std::slice::from_raw_parts_mut(dst.at(r * v), v) };
                row.copy_from_slice(&x[r * v..(r + 1) * v]);
                row_grad(row, lse[r], targets[r], g[r]);
            }
        });
    FlexTensor::from_data(TensorData::new(d, [n, v]))
}

#[cfg(test)]
mod tests {
    use super::super::to_vec;
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

    /// The fused op against burn's log-softmax + gather: values and the logits' gradient, with logits that are the
    /// output of another op (so backward writes into their buffer) and a strided view (so it cannot).
    #[test]
    fn target_logprobs_match_log_softmax_and_gather() {
        let device = Device::flex().autodiff();
        device.seed(7);
        let (n, v) = (9, 1000);
        let targets: Vec<i64> = (0..n as i64).map(|i| (i * 97 + 5) % v as i64).collect();
        for transposed in [false, true] {
            let w: Tensor<2> =
                Tensor::random([n, v], Distribution::Normal(0.0, 3.0), &device).require_grad();
            let make = || {
                if transposed {
                    (w.clone().transpose() * 1.0).transpose()
                } else {
                    w.clone() * 1.0
                }
            };
            let weights: Tensor<1> = Tensor::random([n], Distribution::Default, &device);
            let fused = super::target_logprobs(&make(), &targets).expect("flex f32");
            let ids = Tensor::<2, Int>::from_data(
                TensorData::new(targets.iter().map(|&t| t as i32).collect(), [n, 1]),
                &device,
            );
            let reference = log_softmax(make(), 1).gather(1, ids).reshape([n]);
            let (a, b) = (to_vec(reference.clone()), to_vec(fused.clone()));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
            }
            let gr = (reference * weights.clone()).sum().backward();
            let gf = (fused * weights).sum().backward();
            let (a, b) = (to_vec(w.grad(&gr).unwrap()), to_vec(w.grad(&gf).unwrap()));
            assert!(a.iter().any(|x| x.abs() > 1e-2));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 + 1e-5 * x.abs(), "grad {x} vs {y}");
            }
        }
        // a target outside the vocabulary is left to burn (which reports it)
        let x: Tensor<2> = Tensor::zeros([1, 4], &device);
        assert!(super::target_logprobs(&x, &[4]).is_none());
    }
}
