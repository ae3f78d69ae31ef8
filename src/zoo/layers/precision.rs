//! Mixed precision, the zoo's side: where matrix products compute and which stored weights may be bf16.
//!
//! burn has no autocast (BURN_NOTES), so it is written here, as `torch.autocast` does it: inside an
//! [`autocast`] scope every product of the zoo's [`Linear`](super::linear::Linear) layers and the tied LM head
//! casts its operands to the scope's dtype (bf16) and its result back to the activations' dtype (f32). `cast` is
//! differentiable, so the weights, their gradients and the optimizer's moments stay f32 ("master weights") while
//! the products, and the operands autodiff keeps for the backward pass, are bf16. Feed-forward blocks run whole in
//! bf16 ([`within`]: products and activation, as autocast leaves an activation in its input's dtype). The residual
//! stream, norms, attention scores and softmax, rotary embeddings, the loss and every reduction stay f32.
//!
//! [`store`] holds frozen weights in bf16 (`frozen_dtype = "bf16"`): the weights of Linear and Embedding modules,
//! i.e. the layers whose forwards read their weight through [`to`]. Norm scales, biases, position tables of
//! patch encoders and learned queries stay f32 (they are small).
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Tensor};
use std::cell::Cell;

thread_local! {
    static COMPUTE: Cell<Option<DType>> = const { Cell::new(None) };
}

/// The scope of [`autocast`]; restores the previous compute dtype when dropped.
#[must_use = "the compute dtype holds only while the guard lives"]
pub struct Autocast {
    prev: Option<DType>,
}

impl Drop for Autocast {
    fn drop(&mut self) {
        COMPUTE.with(|c| c.set(self.prev));
    }
}

/// Matrix products in `dtype` until the guard drops (None: in the operands' own dtype, i.e. f32). Per thread: the
/// forward and backward passes of a stage run on the thread that holds the guard.
pub fn autocast(dtype: Option<DType>) -> Autocast {
    let prev = COMPUTE.with(|c| c.replace(dtype));
    Autocast { prev }
}

/// The dtype matrix products compute in here, if an [`autocast`] scope sets one.
pub fn compute() -> Option<DType> {
    COMPUTE.with(|c| c.get())
}

/// `t` in `dtype` (no op when it already is).
pub fn to<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// `f(x)` with x in the compute dtype (bf16 inside an autocast scope), the result back in x's dtype: a chain of
/// products and elementwise ops (a feed-forward block) whose intermediates, the tensors autodiff keeps for the
/// backward pass, are then bf16, as under torch's autocast. Outside a scope: `f(x)`.
pub fn within<const D: usize, const E: usize>(
    x: Tensor<D>,
    f: impl FnOnce(Tensor<D>) -> Tensor<E>,
) -> Tensor<E> {
    let Some(c) = compute() else { return f(x) };
    let out = x.dtype();
    to(f(to(x, c)), out)
}

/// `x · w (+ b)` in the autocast dtype, returned in x's dtype. x: [.., k], w: [k, n] (any stored dtype).
pub fn matmul_bias<const D: usize>(x: Tensor<D>, w: Tensor<2>, b: Option<Tensor<1>>) -> Tensor<D> {
    let out = x.dtype();
    let c = compute().unwrap_or(out);
    let y = burn::tensor::module::linear(to(x, c), to(w, c), b.map(|b| to(b, c)));
    to(y, out)
}

/// What a float parameter is, for the storage rules: the weight of a Linear or an Embedding module (read through
/// [`to`] by their forwards, so they may be stored in bf16), or anything else (always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Linear,
    Embedding,
    Other,
}

/// Every float parameter stored as training needs it: trained ones (those requiring gradients) in f32, frozen
/// Linear and Embedding weights in `frozen` (bf16 or f32), the other frozen parameters in f32.
pub fn store<M: Module>(model: M, frozen: DType) -> M {
    store_with(model, |_, kind, trained| match kind {
        Kind::Linear | Kind::Embedding if !trained => frozen,
        _ => DType::F32,
    })
}

/// Each float parameter in the dtype `rule(path, kind, requires_grad)` gives (f32 or bf16; a QLoRA base stays
/// quantized). Values are copied as new leaves (a cast recorded under autodiff could not be marked trainable by a
/// later stage); f32 → bf16 → f32 is exact on bf16 values, so saving (in f32) and resuming a bf16-stored model
/// reproduces it.
pub fn store_with<M: Module>(model: M, rule: impl FnMut(&str, Kind, bool) -> DType) -> M {
    struct Store<F> {
        rule: F,
        stack: crate::zoo::path::PathStack,
    }
    impl<F: FnMut(&str, Kind, bool) -> DType> ModuleMapper for Store<F> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.stack.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let kind = match self.stack.last() {
                Some(("weight", "Struct:Linear")) => Kind::Linear,
                Some(("weight", "Struct:Embedding")) => Kind::Embedding,
                _ => Kind::Other,
            };
            let want = (self.rule)(&self.stack.path(), kind, p.is_require_grad());
            let have = p.dtype();
            if have == want || matches!(have, DType::QFloat(_)) {
                return p;
            }
            let (id, t, mapper) = p.consume();
            let grad = t.is_require_grad();
            let autodiff = t.is_autodiff();
            let c = t.inner().cast(want);
            let c = if autodiff { c.autodiff() } else { c };
            let c = if grad { c.require_grad() } else { c };
            Param::from_mapped_value(id, c, mapper)
        }
    }
    model.map(&mut Store {
        rule,
        stack: Default::default(),
    })
}

/// Bytes of every float parameter as stored (what `store` saves).
pub fn param_bytes<M: Module>(model: &M) -> usize {
    struct Bytes(usize);
    impl burn::module::ModuleVisitor for Bytes {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.0 += p.shape().num_elements() * p.dtype().size();
        }
    }
    let mut b = Bytes(0);
    model.visit(&mut b);
    b.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::layers::linear::LinearConfig;
    use burn::tensor::{Device, Distribution};

    fn round_bf16(v: f32) -> f32 {
        burn::tensor::bf16::from_f32(v).to_f32()
    }

    /// Inside the scope a Linear computes on bf16-rounded operands with f32 results, outside in f32; the gradients
    /// of its f32 weights and input come back in f32 and follow the bf16 product's.
    #[test]
    fn autocast_rounds_operands_and_keeps_f32_weights_and_gradients() {
        let device = Device::flex().autodiff();
        device.seed(11);
        let lin = LinearConfig::new(8, 3).init(&device);
        let x: Tensor<2> = Tensor::random([4, 8], Distribution::Default, &device).require_grad();
        let full = lin.forward(x.clone());
        let half = {
            let _g = autocast(Some(DType::BF16));
            lin.forward(x.clone())
        };
        assert_eq!(compute(), None, "the scope ended");
        assert_eq!(half.dtype(), DType::F32);
        let (xs, ws, bs) = (
            crate::zoo::layers::to_vec(x.clone()),
            crate::zoo::layers::to_vec(lin.weight.val()),
            crate::zoo::layers::to_vec(lin.bias.as_ref().unwrap().val()),
        );
        let (f, h) = (
            crate::zoo::layers::to_vec(full),
            crate::zoo::layers::to_vec(half.clone()),
        );
        let mut differs = false;
        for r in 0..4 {
            for o in 0..3 {
                let terms: Vec<f32> = (0..8)
                    .map(|i| round_bf16(xs[r * 8 + i]) * round_bf16(ws[i * 3 + o]))
                    .chain([round_bf16(bs[o])])
                    .collect();
                let want: f32 = terms.iter().sum();
                // two bf16 roundings (the product, then the bias add): 2^-8 each, of the terms' scale
                let scale: f32 = terms.iter().map(|t| t.abs()).sum();
                let got = h[r * 3 + o];
                assert!((got - want).abs() <= 2.0 * scale / 256.0, "{got} vs {want}");
                differs |= got != f[r * 3 + o];
            }
        }
        assert!(differs, "bf16 products differ from the f32 ones");
        let g = half.sum().backward();
        let gw = lin.weight.val().grad(&g).expect("weight gradient");
        assert_eq!(gw.dtype(), DType::F32);
        // d(sum)/dW[i][o] = Σ_r x[r][i]: the bf16 rounding of x, summed
        let gw = crate::zoo::layers::to_vec(gw);
        for i in 0..8 {
            let want: f32 = (0..4).map(|r| round_bf16(xs[r * 8 + i])).sum();
            assert!(
                (gw[i * 3] - want).abs() <= 2e-2 * want.abs().max(1e-2),
                "{} vs {want}",
                gw[i * 3]
            );
        }
        assert_eq!(x.grad(&g).expect("input gradient").dtype(), DType::F32);
    }

    /// Frozen Linear weights go to bf16 and back exactly; trained ones and norm-like parameters stay f32 and
    /// trainable.
    #[test]
    fn store_casts_frozen_linear_weights_only() {
        let device = Device::flex().autodiff();
        device.seed(5);
        #[derive(Module, Debug)]
        struct Two {
            a: crate::zoo::layers::linear::Linear,
            b: crate::zoo::layers::linear::Linear,
        }
        let m = Two {
            a: LinearConfig::new(4, 4).init(&device),
            b: LinearConfig::new(4, 4).init(&device),
        };
        let m = Two {
            a: m.a.no_grad(),
            b: m.b,
        };
        let before = crate::zoo::layers::to_vec(m.a.weight.val());
        let m = store(m, DType::BF16);
        assert_eq!(m.a.weight.dtype(), DType::BF16);
        assert_eq!(m.a.bias.as_ref().unwrap().dtype(), DType::F32);
        assert_eq!(m.b.weight.dtype(), DType::F32);
        assert!(m.b.weight.is_require_grad());
        assert_eq!(param_bytes(&m), (16 * 2 + 4 * 4) + (16 + 4) * 4);
        let back = store(m, DType::F32);
        let after = crate::zoo::layers::to_vec(back.a.weight.val());
        for (x, y) in before.iter().zip(&after) {
            assert_eq!(round_bf16(*x), *y);
        }
        // a bf16-stored frozen layer still runs in an f32 forward
        let x: Tensor<2> = Tensor::random([2, 4], Distribution::Default, &device);
        let y = store(back, DType::BF16).a.forward(x);
        assert_eq!(y.dtype(), DType::F32);
    }
}
