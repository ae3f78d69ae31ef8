//! Activation functions named as in HuggingFace configs (`hidden_act`, `projector_hidden_act`). Unknown names are
//! rejected at config-parse time, so a model never silently runs with the wrong nonlinearity.
use burn::tensor::{Tensor, activation};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    /// Exact (erf) GELU: transformers' "gelu".
    Gelu,
    /// tanh-approximated GELU: "gelu_pytorch_tanh" (SigLIP), "gelu_new", "gelu_fast".
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_new", alias = "gelu_fast")]
    GeluTanh,
    /// CLIP's x * sigmoid(1.702 x).
    QuickGelu,
    /// x * sigmoid(x): "silu" / "swish" (LLaMA, Qwen2 MLPs).
    #[serde(alias = "swish")]
    Silu,
    Relu,
}

impl Act {
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Act::Gelu => activation::gelu(x),
            Act::GeluTanh => activation::gelu_approximate(x),
            Act::QuickGelu => x.clone() * activation::sigmoid(x * 1.702),
            Act::Silu => activation::silu(x),
            Act::Relu => activation::relu(x),
        }
    }

    /// The name transformers writes in config.json.
    pub fn hf_name(self) -> &'static str {
        match self {
            Act::Gelu => "gelu",
            Act::GeluTanh => "gelu_pytorch_tanh",
            Act::QuickGelu => "quick_gelu",
            Act::Silu => "silu",
            Act::Relu => "relu",
        }
    }
}
