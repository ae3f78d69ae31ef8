//! Pooling connector (token compression, MM1's "number of visual tokens matters most"): the encoder's patch grid
//! [h, w] pooled to `grid`×`grid`, or by `factor` per side — adaptive average pooling (PyTorch `adaptive_avg_pool2d`'s bins) or bilinear
//! resampling (`interpolate(mode="bilinear", align_corners=False)`, as LLaVA-OneVision pools video frames) — then
//! the LLaVA MLP (`linear_{i}` keys). Pooling before the MLP keeps the projection's cost at the pooled count.
//! transformers has no LLaVA variant with this connector: it saves in mitune's layout (`mitune_connector` in
//! config.json), which mitune reloads.
use crate::zoo::layers::linear::Linear;
use burn::module::Module;
use burn::tensor::module::{adaptive_avg_pool2d, interpolate};
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Features, mlp};
use crate::zoo::layers::act::Act;
use crate::zoo::llms::LlmSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    Avg,
    Bilinear,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Side of the pooled grid: grid² image tokens whatever the resolution. Give `grid` or `factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<usize>,
    /// Shrink each side by this factor (⌈side / factor⌉, as LLaVA-OneVision's 2× pooling): tokens / factor².
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<usize>,
    #[serde(default = "avg")]
    pub mode: PoolMode,
    /// Depth of the MLP after pooling.
    #[serde(default = "two")]
    pub depth: usize,
    #[serde(default = "gelu")]
    pub act: Act,
}
fn avg() -> PoolMode {
    PoolMode::Avg
}
fn two() -> usize {
    2
}
fn gelu() -> Act {
    Act::Gelu
}

#[derive(Module, Debug)]
pub struct Pool {
    pub layers: Vec<Linear>,
    #[module(skip)]
    pub act: Act,
    #[module(skip)]
    pub mode: PoolMode,
    /// (input grid rows, cols, output rows, cols)
    #[module(skip)]
    pub shape: (usize, usize, usize, usize),
}

impl PoolSpec {
    pub fn out_tokens(&self, f: &Features) -> Result<usize, String> {
        let Some((h, w)) = f.grid else {
            return Err(format!(
                "connector pool needs the encoder's patch grid, but its {} tokens include a class token \
                 (use select = \"patch\" with a CLIP encoder)",
                f.tokens
            ));
        };
        if self.depth == 0 {
            return Err("connector pool: depth must be at least 1".into());
        }
        let (gh, gw) = self.out_grid(h, w)?;
        Ok(gh * gw)
    }

    /// The pooled grid for an h×w patch grid.
    pub fn out_grid(&self, h: usize, w: usize) -> Result<(usize, usize), String> {
        match (self.grid, self.factor) {
            (Some(g), None) => {
                if g == 0 || g > h.min(w) {
                    return Err(format!(
                        "connector pool: grid = {g} is larger than the encoder's {h}×{w} patch grid (or 0); \
                         pooling only shrinks: choose 1..={}",
                        h.min(w)
                    ));
                }
                Ok((g, g))
            }
            (None, Some(f)) => {
                if f == 0 {
                    return Err("connector pool: factor must be at least 1".into());
                }
                Ok((h.div_ceil(f), w.div_ceil(f)))
            }
            _ => Err("connector pool: give exactly one of `grid` (output side) or `factor` (shrink per side)".into()),
        }
    }

    pub fn init(&self, f: &Features, llm: &LlmSpec, bias: bool, device: &Device) -> Pool {
        let (h, w) = f.grid.unwrap_or((1, f.tokens));
        let (gh, gw) = self.out_grid(h, w).unwrap_or((1, 1));
        Pool {
            layers: mlp::layers(self.depth, f.width, llm.hidden_size, bias, device),
            act: self.act,
            mode: self.mode,
            shape: (h, w, gh, gw),
        }
    }
}

impl Pool {
    /// x: [n, h·w, width] -> [n, gh·gw, d_llm]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, _, d] = x.dims();
        let (h, w, gh, gw) = self.shape;
        let grid = x.reshape([n, h, w, d]).permute([0, 3, 1, 2]); // [n, d, h, w]
        let pooled = match self.mode {
            PoolMode::Avg => adaptive_avg_pool2d(grid, [gh, gw]),
            PoolMode::Bilinear => interpolate(
                grid,
                InterpolateOptions {
                    mode: InterpolateMode::Bilinear,
                    align_corners: false,
                    output_size: Some([gh, gw]),
                    scale_factor: None,
                },
            ),
        };
        let tokens = pooled.permute([0, 2, 3, 1]).reshape([n, gh * gw, d]);
        mlp::forward_layers(&self.layers, self.act, tokens)
    }
}
