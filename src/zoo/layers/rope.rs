//! Rotary position embeddings in HuggingFace's `rotate_half` convention (the first half of each head's dims pairs
//! with the second half), with `rope_theta` and the rope-scaling types LLaMA-family checkpoints ship:
//! default, linear and llama3 (transformers `modeling_rope_utils._compute_llama3_parameters`), and Qwen2-VL's
//! multimodal RoPE (M-RoPE): three position axes (temporal, height, width), each rotating its own section of the
//! frequencies (`mrope_section`, e.g. [16, 24, 24] of 64), so an image's tokens carry their 2-D place.
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::float_tensor;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RopeScaling {
    Default {},
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f64,
    pub head_dim: usize,
    pub scaling: RopeScaling,
    /// M-RoPE: frequencies per axis (temporal, height, width), summing to head_dim / 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrope_section: Option<Vec<usize>>,
}

impl Rope {
    /// Inverse frequencies, one per rotated pair: [head_dim / 2].
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f64 / d))
            .collect();
        match &self.scaling {
            RopeScaling::Default {} => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// cos and sin tables for the given positions: each [b, 1, t, head_dim] (broadcast over heads). With M-RoPE,
    /// `positions` holds 3·b rows (all temporal rows, then height, then width) or b rows (text: the three axes
    /// equal, as transformers expands 2-D position ids).
    pub fn tables_for(
        &self,
        positions: &[Vec<i64>],
        b: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let Some(section) = &self.mrope_section else {
            return self.tables(positions, device);
        };
        let axes = if positions.len() == 3 * b { 3 } else { 1 };
        // axis of each frequency: transformers' `split(mrope_section)` chunk i reads axis i % 3
        let axis_of: Vec<usize> = section
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(i % 3, n))
            .collect();
        let inv = self.inv_freq();
        let (t, d) = (positions[0].len(), self.head_dim);
        let mut cos = Vec::with_capacity(b * t * d);
        let mut sin = Vec::with_capacity(b * t * d);
        for r in 0..b {
            for j in 0..t {
                for _half in 0..2 {
                    for (f, inv_f) in inv.iter().enumerate() {
                        let a_i = axis_of.get(f).copied().unwrap_or(0) % axes;
                        let p = positions[a_i * b + r][j];
                        let a = (p as f32) * (*inv_f as f32);
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
        }
        (
            float_tensor(cos, [b, 1, t, d], device),
            float_tensor(sin, [b, 1, t, d], device),
        )
    }

    /// cos and sin tables for the given positions: each [b, 1, t, head_dim] (broadcast over heads).
    pub fn tables(&self, positions: &[Vec<i64>], device: &Device) -> (Tensor<4>, Tensor<4>) {
        let inv = self.inv_freq();
        let (b, t, d) = (positions.len(), positions[0].len(), self.head_dim);
        let mut cos = Vec::with_capacity(b * t * d);
        let mut sin = Vec::with_capacity(b * t * d);
        for row in positions {
            for &p in row {
                // emb = cat(freqs, freqs): both halves use the same frequencies. f32 as transformers computes it.
                for _half in 0..2 {
                    for f in &inv {
                        let a = (p as f32) * (*f as f32);
                        cos.push(a.cos());
                        sin.push(a.sin());
                    }
                }
            }
        }
        (
            float_tensor(cos, [b, 1, t, d], device),
            float_tensor(sin, [b, 1, t, d], device),
        )
    }
}

/// x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1). x: [b, h, t, head_dim].
pub fn apply(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    // one pass forward and backward on the CPU backend, the same bits (`fused::rope`)
    if let Some(y) = super::fused::rope(&x, cos, sin) {
        return y;
    }
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}
