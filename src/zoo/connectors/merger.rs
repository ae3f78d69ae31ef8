//! Qwen2-VL's patch merger (transformers `PatchMerger`): LayerNorm (`ln_q`, eps 1e-6) on each patch feature, then
//! each 2×2 block of patches (consecutive in the processor's order) concatenated into one token of 4× the width,
//! and an MLP (`mlp.0`, exact GELU, `mlp.2`) to the LLM's width. Tokens drop by merge²; the encoder's patch order
//! makes the block a plain reshape. In a Qwen2-VL checkpoint these tensors are `visual.merger.*`
//! (`checkpoint::qwen2vl` maps `fc1`/`fc2` to `mlp.0`/`mlp.2`). Qwen2.5-VL's `ln_q` is an RMSNorm (`rms_norm`).
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::Features;
use crate::zoo::layers::act::Act;
use crate::zoo::layers::norm::Norm;
use crate::zoo::llms::LlmSpec;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergerSpec {
    /// Side of the patch block merged into one token (`spatial_merge_size`).
    #[serde(default = "two")]
    pub merge: usize,
    /// Qwen2.5-VL: RMSNorm instead of LayerNorm before merging.
    #[serde(default)]
    pub rms_norm: bool,
}
fn two() -> usize {
    2
}

#[derive(Module, Debug)]
pub struct Merger {
    pub ln_q: Norm,
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    pub merge: usize,
}

impl MergerSpec {
    pub fn out_tokens(&self, f: &Features) -> Result<usize, String> {
        let m2 = self.merge * self.merge;
        if m2 == 0 || f.tokens % m2 != 0 {
            return Err(format!(
                "connector merger: {} patches do not form {}×{} blocks",
                f.tokens, self.merge, self.merge
            ));
        }
        Ok(f.tokens / m2)
    }

    pub fn init(&self, f: &Features, llm: &LlmSpec, device: &Device) -> Merger {
        let wide = f.width * self.merge * self.merge;
        Merger {
            ln_q: Norm::new(f.width, 1e-6, self.rms_norm, device),
            fc1: LinearConfig::new(wide, wide).init(device),
            fc2: LinearConfig::new(wide, llm.hidden_size).init(device),
            merge: self.merge,
        }
    }
}

impl Merger {
    /// x [n, patches, d] (patches in merge-block order) -> [n, patches / merge², d_llm]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, t, d] = x.dims();
        let m2 = self.merge * self.merge;
        let y = self.ln_q.forward(x).reshape([n, t / m2, d * m2]);
        crate::zoo::layers::precision::within(y, |y| {
            self.fc2.forward(Act::Gelu.forward(self.fc1.forward(y)))
        })
    }
}
