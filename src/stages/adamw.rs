//! AdamW in one pass per parameter on the CPU backend. burn's `AdamW` runs each step as ~14 full-size tensor
//! ops per parameter (moments, bias corrections, square root, division, decay, update), each reading and writing
//! whole tensors: for small-instruct's 100M trained parameters that is ~10 GB of memory traffic per step. Here
//! the same f32 expressions, in the same order (so the same bits as burn's AdamW: `tests` below check it), run
//! in one threaded pass over parameter, gradient and both moments, in place: burn-flex hands a tensor held once to
//! `into_data` and back from `from_data` without a copy. The state is burn's `AdamWState`, so optimizer
//! checkpoints are the same files. Other devices (GPUs), dtypes and AMSGrad state take burn's `AdamW`.
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

#[derive(Clone)]
pub struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    /// burn's AdamW with the same settings, for what this does not fuse
    fallback: AdamW,
}

impl FusedAdamW {
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        let fallback = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        FusedAdamW {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            fallback,
        }
    }
}

/// A tensor's f32 elements as owned data (no copy for a contiguous tensor held once on burn-flex).
fn f32_data<const D: usize>(t: Tensor<D>) -> Option<TensorData> {
    let data = t.into_data();
    (data.dtype() == DType::F32).then_some(data)
}

/// Elements per rayon piece: large enough that splitting costs nothing next to the memory traffic.
const PIECE: usize = 1 << 15;

/// The step's scalars, rounded to f32 as burn's scalar ops round them.
struct Consts {
    b1: f32,
    b2: f32,
    f1: f32,
    f2: f32,
    c1: f32,
    c2: f32,
    eps: f32,
    keep: f32,
    lr: f32,
}

/// One piece of the update, element by element in burn's order of operations (Rust never fuses `a * b + c`
/// into an FMA, so each variant below gives the same bits):
/// m1 = m1·β1 + g·(1-β1), m2 = m2·β2 + g²·(1-β2) (at the first step m1 = g·(1-β1), m2 = g²·(1-β2), as burn
/// starts them: not 0·β1 + …, which would turn a -0 into +0), p = p·(1 - lr·wd) - (m1/c1) / (√(m2/c2) + ε)·lr.
#[inline(always)]
fn update<const FIRST: bool>(p: &mut [f32], g: &[f32], m1: &mut [f32], m2: &mut [f32], c: &Consts) {
    for (((p, &g), m1), m2) in p.iter_mut().zip(g).zip(m1.iter_mut()).zip(m2.iter_mut()) {
        let (a, v) = if FIRST {
            (g * c.f1, (g * g) * c.f2)
        } else {
            (*m1 * c.b1 + g * c.f1, *m2 * c.b2 + (g * g) * c.f2)
        };
        *m1 = a;
        *m2 = v;
        let delta = (a / c.c1) / ((v / c.c2).sqrt() + c.eps);
        *p = *p * c.keep - delta * c.lr;
    }
}

crate::zoo::layers::cpu::widest! {
    /// `update` for the first step or a later one, compiled for the widest vectors the CPU has (the same Rust, so
    /// the same bits).
    fn update_piece(p: &mut [f32], g: &[f32], m1: &mut [f32], m2: &mut [f32], c: &Consts, first: bool) {
        if first {
            update::<true>(p, g, m1, m2, c)
        } else {
            update::<false>(p, g, m1, m2, c)
        }
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let device = tensor.device();
        let fusable = device == Device::flex()
            && tensor.dtype() == DType::F32
            && grad.dtype() == DType::F32
            && state.as_ref().is_none_or(|s| {
                s.momentum.max_moment_2.is_none()
                    && s.momentum.moment_1.dtype() == DType::F32
                    && s.momentum.moment_2.dtype() == DType::F32
            });
        if !fusable {
            return self.fallback.step(lr, tensor, grad, state);
        }
        let shape = tensor.shape();
        let (b1, b2, eps) = (self.beta_1, self.beta_2, self.epsilon);
        let (f1, f2) = (1.0 - b1, 1.0 - b2);
        let time = state.as_ref().map_or(1, |s| s.momentum.time + 1);
        // burn's scalar ops take f64 and compute in the element type: the same roundings here
        let c1 = 1f32 - b1.powi(time as i32);
        let c2 = 1f32 - b2.powi(time as i32);
        // burn skips the decay when lr·wd = 0; multiplying by (1 - 0) = 1 gives the same bits
        let keep = (1.0 - lr * self.weight_decay as f64) as f32;
        let lr = lr as f32;

        let (Some(mut p), Some(g)) = (f32_data(tensor), f32_data(grad)) else {
            unreachable!("dtypes checked above")
        };
        let n = p.num_elements();
        let (mut m1, mut m2) = match state {
            Some(s) => (
                f32_data(s.momentum.moment_1).expect("checked f32"),
                f32_data(s.momentum.moment_2).expect("checked f32"),
            ),
            None => (
                TensorData::new(vec![0f32; n], shape.clone()),
                TensorData::new(vec![0f32; n], shape.clone()),
            ),
        };
        let c = Consts {
            b1,
            b2,
            f1,
            f2,
            c1,
            c2,
            eps,
            keep,
            lr,
        };
        {
            let gs = g.as_slice::<f32>().expect("f32");
            let ps = p.as_mut_slice::<f32>().expect("f32");
            let m1s = m1.as_mut_slice::<f32>().expect("f32");
            let m2s = m2.as_mut_slice::<f32>().expect("f32");
            ps.par_chunks_mut(PIECE)
                .zip(gs.par_chunks(PIECE))
                .zip(m1s.par_chunks_mut(PIECE))
                .zip(m2s.par_chunks_mut(PIECE))
                .for_each(|(((p, g), m1), m2)| update_piece(p, g, m1, m2, &c, time == 1));
        }
        let state = AdamWState {
            momentum: AdaptiveMomentumState {
                time,
                moment_1: Tensor::from_data(m1, &device),
                moment_2: Tensor::from_data(m2, &device),
                max_moment_2: None,
            },
        };
        (Tensor::from_data(p, &device), Some(state))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <AdamW as Optimizer>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Three steps on parameters of uneven size (one split into several rayon pieces), with and without weight
    /// decay: the fused pass gives burn's AdamW's parameters and moments to the bit.
    #[test]
    fn fused_steps_equal_burns_adamw_bit_for_bit() {
        let device = Device::flex();
        device.seed(7);
        for wd in [0.0f32, 0.05] {
            let fused = FusedAdamW::new(0.9, 0.95, 1e-8, wd);
            let plain = AdamWConfig::new()
                .with_beta_1(0.9)
                .with_beta_2(0.95)
                .with_epsilon(1e-8)
                .with_weight_decay(wd)
                .build();
            // 3 · PIECE + 123 elements: three full rayon pieces and a short one
            let mut p: Tensor<2> =
                Tensor::random([PIECE + 41, 3], Distribution::Normal(0.0, 1.0), &device);
            let mut q = p.clone();
            let (mut sf, mut sp) = (None, None);
            for step in 0..3 {
                let g: Tensor<2> =
                    Tensor::random(p.shape(), Distribution::Normal(0.0, 0.1), &device);
                let lr = 1e-3 * (step + 1) as f64;
                (p, sf) = fused.step(lr, p, g.clone(), sf);
                (q, sp) = plain.step(lr, q, g, sp);
                let bits = |t: &Tensor<2>| -> Vec<u32> {
                    crate::zoo::layers::to_vec(t.clone())
                        .iter()
                        .map(|x| x.to_bits())
                        .collect()
                };
                assert_eq!(bits(&p), bits(&q), "parameters, step {step}, wd {wd}");
                let (a, b) = (
                    &sf.as_ref().unwrap().momentum,
                    &sp.as_ref().unwrap().momentum,
                );
                assert_eq!(a.time, b.time);
                assert_eq!(
                    bits(&a.moment_1),
                    bits(&b.moment_1),
                    "first moment, step {step}"
                );
                assert_eq!(
                    bits(&a.moment_2),
                    bits(&b.moment_2),
                    "second moment, step {step}"
                );
            }
        }
    }
}
