//! The gated feed-forward of LLaMA-family decoders and of Idefics2's perceiver: down(act(gate(x)) · up(x))
//! (SwiGLU with act = silu). Field names are transformers' (`gate_proj`, `up_proj`, `down_proj`).
use super::linear::{Linear, LinearConfig};
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::act::Act;

#[derive(Module, Debug)]
pub struct GatedMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    #[module(skip)]
    pub act: Act,
}

impl GatedMlp {
    /// d_in -> d_mid (gate, up) -> d_out (down).
    pub fn new(
        d_in: usize,
        d_mid: usize,
        d_out: usize,
        bias: bool,
        act: Act,
        device: &Device,
    ) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).with_bias(bias).init(device);
        GatedMlp {
            gate_proj: lin(d_in, d_mid),
            up_proj: lin(d_in, d_mid),
            down_proj: lin(d_mid, d_out),
            act,
        }
    }

    /// x: [n, t, d_in] -> [n, t, d_out]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        // bf16 throughout inside an autocast scope
        super::precision::within(x, |x| {
            let (g, u) = (self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
            // silu(g) · u in one pass on the CPU backend (`fused::swiglu`)
            let fused = (self.act == Act::Silu)
                .then(|| super::fused::swiglu(&g, &u))
                .flatten();
            self.down_proj
                .forward(fused.unwrap_or_else(|| self.act.forward(g) * u))
        })
    }
}
