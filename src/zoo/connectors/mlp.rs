//! Linear / MLP projector: linear → (act → linear) × (depth − 1). transformers' `LlavaMultiModalProjector` is depth 2
//! with keys `linear_1`, `linear_2` (mapped in `checkpoint::keys`).
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::zoo::layers::act::Act;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConnectorSpec {
    Linear {},
    Mlp {
        depth: usize,
        #[serde(default = "gelu")]
        act: Act,
    },
}
fn gelu() -> Act {
    Act::Gelu
}

#[derive(Module, Debug)]
pub struct Projector {
    pub layers: Vec<Linear>,
    #[module(skip)]
    pub act: Act,
}

impl ConnectorSpec {
    pub fn depth(&self) -> usize {
        match self {
            ConnectorSpec::Linear {} => 1,
            ConnectorSpec::Mlp { depth, .. } => *depth,
        }
    }
    pub fn act(&self) -> Act {
        match self {
            ConnectorSpec::Linear {} => Act::Gelu,
            ConnectorSpec::Mlp { act, .. } => *act,
        }
    }

    /// d_in: encoder feature width (× selected layers); d_out: the LLM's hidden size.
    pub fn init(&self, d_in: usize, d_out: usize, bias: bool, device: &Device) -> Projector {
        let layers = (0..self.depth().max(1))
            .map(|i| {
                LinearConfig::new(if i == 0 { d_in } else { d_out }, d_out)
                    .with_bias(bias)
                    .init(device)
            })
            .collect();
        Projector {
            layers,
            act: self.act(),
        }
    }
}

impl Projector {
    /// x: [n, tokens, d_in] -> [n, tokens, d_out]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mut h = self.layers[0].forward(x);
        for l in &self.layers[1..] {
            h = l.forward(self.act.forward(h));
        }
        h
    }
}
