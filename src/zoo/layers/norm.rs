//! A norm that is LayerNorm in one family and RMSNorm in its successor (Qwen2-VL's ViT and merger use LayerNorm,
//! Qwen2.5-VL's RMSNorm), as one module enum: transparent in module paths, so both load `norm1.weight`.
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{Device, Tensor};

#[derive(Module, Debug)]
pub enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    pub fn new(d: usize, eps: f64, rms: bool, device: &Device) -> Self {
        if rms {
            Norm::Rms(RmsNormConfig::new(d).with_epsilon(eps).init(device))
        } else {
            Norm::Layer(LayerNormConfig::new(d).with_epsilon(eps).init(device))
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => rms(n, x),
        }
    }
}

/// `n.forward(x)`, fused on the CPU backend (`fused::rms_norm`: one pass forward and backward).
pub fn rms<const D: usize>(n: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    super::fused::rms_norm(&x, &n.gamma.val(), n.epsilon).unwrap_or_else(|| n.forward(x))
}
