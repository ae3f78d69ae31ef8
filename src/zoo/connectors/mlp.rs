//! Linear / MLP projector: linear → (act → linear) × (depth − 1), token count unchanged. transformers'
//! `LlavaMultiModalProjector` is depth 2 with keys `linear_1`, `linear_2` (`layers.{i}` here; mapped in
//! `zoo::keys::projector`). Other depths save with LLaVA's `mm_projector_type` (`linear`, `mlp3x_gelu`).
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::zoo::layers::act::Act;

#[derive(Module, Debug)]
pub struct Projector {
    pub layers: Vec<Linear>,
    #[module(skip)]
    pub act: Act,
}

/// `depth` linears from `d_in` to `d_out` (the first changes the width, the others keep it).
pub fn init(
    depth: usize,
    act: Act,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &Device,
) -> Projector {
    Projector {
        layers: layers(depth, d_in, d_out, bias, device),
        act,
    }
}

pub(crate) fn layers(
    depth: usize,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &Device,
) -> Vec<Linear> {
    (0..depth.max(1))
        .map(|i| {
            LinearConfig::new(if i == 0 { d_in } else { d_out }, d_out)
                .with_bias(bias)
                .init(device)
        })
        .collect()
}

/// x: [n, tokens, d_in] -> [n, tokens, d_out]
pub(crate) fn forward_layers(layers: &[Linear], act: Act, x: Tensor<3>) -> Tensor<3> {
    // bf16 throughout inside an autocast scope
    crate::zoo::layers::precision::within(x, |x| {
        let mut h = layers[0].forward(x);
        for l in &layers[1..] {
            h = l.forward(act.forward(h));
        }
        h
    })
}

impl Projector {
    /// x: [n, tokens, d_in] -> [n, tokens, d_out]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        forward_layers(&self.layers, self.act, x)
    }
}
