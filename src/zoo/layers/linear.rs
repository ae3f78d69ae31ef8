//! The zoo's Linear layer: burn's `nn::Linear` (same fields, same `Struct:Linear` module name, so checkpoints,
//! key tables and LoRA targeting see no difference) with a low-rank forward for a LoRA-adapted weight.
//!
//! burn's `Param::val()` on an adapted weight returns `W + s·A·B` — a dense [in, out] tensor rebuilt at every
//! forward, whose backward materialises a weight-shaped gradient before it reaches the factors. PEFT computes
//! `y = x·W + s·(x·A)·B` instead: two thin matmuls beside the frozen one, gradients only [in, r] and [r, out].
//! That is the path here (burn layout: W [in, out], A [in, r], B [r, out]); `val()` stays what merging and
//! saving read. A QLoRA base is stored quantized and dequantized for the product (frozen: no gradient).
use burn::module::Module;
use burn::module::Param;
use burn::nn::LinearConfig as BurnConfig;
use burn::tensor::{DType, Device, Tensor};

use super::precision::matmul_bias;

#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

/// `LinearConfig::new(d_in, d_out).with_bias(b).init(device)`: burn's initialisation (Kaiming uniform, as
/// `nn::Linear`), the zoo's layer.
#[derive(Debug, Clone, Copy)]
pub struct LinearConfig {
    d_in: usize,
    d_out: usize,
    bias: bool,
}

impl LinearConfig {
    pub fn new(d_in: usize, d_out: usize) -> Self {
        LinearConfig {
            d_in,
            d_out,
            bias: true,
        }
    }
    pub fn with_bias(self, bias: bool) -> Self {
        LinearConfig { bias, ..self }
    }
    pub fn init(&self, device: &Device) -> Linear {
        let l = BurnConfig::new(self.d_in, self.d_out)
            .with_bias(self.bias)
            .init(device);
        Linear {
            weight: l.weight,
            bias: l.bias,
        }
    }
}

impl Linear {
    /// x: [..., in] -> [..., out]. Inside an autocast scope (`precision::autocast`) the products run in its dtype
    /// (bf16) and the result comes back in x's; a weight stored in bf16 (`frozen_dtype`) is cast to the compute
    /// dtype here.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        let Some(ad) = self.weight.adapter() else {
            return matmul_bias(x, self.weight.val(), bias);
        };
        let base = self.weight.base();
        let base = if matches!(base.dtype(), DType::QFloat(_)) {
            base.dequantize()
        } else {
            base
        };
        let low = matmul_bias(matmul_bias(x.clone(), ad.a.val(), None), ad.b.val(), None);
        matmul_bias(x, base, bias) + low.mul_scalar(ad.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Lora;
    use burn::optim::{AdamWConfig, GradientsParams};
    use burn::tensor::Distribution;
    use burn::tensor::module::linear;

    fn close(a: Tensor<2>, b: Tensor<2>) {
        let (a, b) = (super::super::to_vec(a), super::super::to_vec(b));
        assert!(a.iter().any(|x| x.abs() > 1e-4));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
        }
    }

    /// The low-rank path gives the merged weight's outputs and the same factor gradients.
    #[test]
    fn low_rank_path_matches_the_merged_weight() {
        let device = Device::flex().autodiff();
        device.seed(7);
        let lin = LinearConfig::new(6, 4)
            .init(&device)
            .apply_lora(Lora::new(2, 4.0));
        let x: Tensor<2> = Tensor::random([5, 6], Distribution::Default, &device);
        // one step so B (zero at init) is not
        let mut opt = AdamWConfig::new().init();
        let g = GradientsParams::from_grads(lin.forward(x.clone()).sum().backward(), &lin);
        let lin = opt.step(0.1, lin, g);
        let ad = lin.weight.adapter().expect("adapted");
        assert!(super::super::to_vec(ad.b.val()).iter().any(|v| *v != 0.0));
        let fast = lin.forward(x.clone());
        let dense = linear(
            x.clone(),
            lin.weight.val(),
            lin.bias.as_ref().map(|b| b.val()),
        );
        close(dense.clone(), fast.clone());
        let (gf, gd) = (
            (fast * 1.5).sum().backward(),
            (dense * 1.5).sum().backward(),
        );
        let ad = lin.weight.adapter().unwrap();
        close(ad.a.val().grad(&gd).unwrap(), ad.a.val().grad(&gf).unwrap());
        close(ad.b.val().grad(&gd).unwrap(), ad.b.val().grad(&gf).unwrap());
        assert!(
            lin.weight.base().grad(&gf).is_none(),
            "the frozen base has no gradient"
        );
    }
}
