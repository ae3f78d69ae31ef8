//! Pixel-shuffle connector (Idefics3 / SmolVLM, transformers `Idefics3Connector`): space-to-depth on the patch
//! grid by `scale` (each scale×scale block of patches becomes one token of scale²× the width), then one linear
//! without bias (`modality_projection.proj`). Tokens drop by scale² at no loss of information; the linear learns
//! how to mix the block. Module names are transformers', so `multi_modal_projector.modality_projection.proj.weight`
//! is `model.connector.modality_projection.proj.weight` of an Idefics3 checkpoint.
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::Features;
use crate::zoo::llms::LlmSpec;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PixelShuffleSpec {
    /// Side of the patch block merged into one token (Idefics3: 2, SmolVLM: 3 or 4).
    #[serde(default = "two")]
    pub scale: usize,
}
fn two() -> usize {
    2
}

#[derive(Module, Debug)]
pub struct SimpleMlp {
    pub proj: Linear,
}

#[derive(Module, Debug)]
pub struct PixelShuffle {
    pub modality_projection: SimpleMlp,
    #[module(skip)]
    pub scale: usize,
}

impl PixelShuffleSpec {
    pub fn out_tokens(&self, f: &Features) -> Result<usize, String> {
        let s = self.scale;
        if s == 0 {
            return Err("connector pixel_shuffle: scale must be at least 1".into());
        }
        let Some((h, w)) = f.grid else {
            return Err(format!(
                "connector pixel_shuffle needs the encoder's patch grid, but its {} tokens include a class token \
                 (use select = \"patch\" with a CLIP encoder)",
                f.tokens
            ));
        };
        if h != w || h % s != 0 {
            return Err(format!(
                "connector pixel_shuffle: the {h}×{w} patch grid is not square and divisible by scale = {s} \
                 (choose an image size whose patch grid is a multiple of {s})"
            ));
        }
        Ok(f.tokens / (s * s))
    }

    pub fn init(&self, f: &Features, llm: &LlmSpec, device: &Device) -> PixelShuffle {
        let d_in = f.width * self.scale * self.scale;
        PixelShuffle {
            modality_projection: SimpleMlp {
                proj: LinearConfig::new(d_in, llm.hidden_size)
                    .with_bias(false)
                    .init(device),
            },
            scale: self.scale,
        }
    }
}

/// Space-to-depth as `Idefics3Connector.pixel_shuffle`: x [n, seq, d] on a square grid -> [n, seq / s², d·s²].
/// Token (i, j) of the output holds patches (s·i + a, s·j + b) with a outer, b inner… in transformers' exact order:
/// view [n, h, w/s, d·s] → swap → [n, w/s, h/s, d·s²] → swap back → flatten.
pub fn shuffle(x: Tensor<3>, s: usize) -> Tensor<3> {
    let [n, seq, d] = x.dims();
    let h = (seq as f64).sqrt().round() as usize;
    let w = h;
    x.reshape([n, h, w / s, d * s])
        .swap_dims(1, 2) // [n, w/s, h, d·s]
        .reshape([n, w / s, h / s, d * s * s])
        .swap_dims(1, 2) // [n, h/s, w/s, d·s²]
        .reshape([n, seq / (s * s), d * s * s])
}

impl PixelShuffle {
    /// x: [n, grid², width] -> [n, grid² / scale², d_llm]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.modality_projection
            .proj
            .forward(shuffle(x, self.scale))
    }
}
