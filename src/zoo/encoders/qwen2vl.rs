//! Qwen2-VL's vision transformer (transformers `modeling_qwen2_vl.py`; Wang et al. 2024, "native dynamic
//! resolution"): an image keeps (about) its own size, so its patch count varies. Patches are 14 px (here any
//! `patch_size`) × `temporal_patch_size` frames (a still image is two equal frames), embedded by a Conv3d whose kernel
//! is the patch; blocks are pre-LN (LayerNorm eps 1e-6) with a fused `qkv` projection, 2-D rotary embeddings (half
//! the rotated frequencies follow the patch's row, half its column) and full attention within one image; the
//! 2×2 patch merger that follows is the connector (`zoo::connectors::merger`).
//!
//! Inputs: the processor's patches in its order (each 2×2 merge block's four patches consecutive, see
//! `data::images`), as [patches, channels·frames, p, p] so batches stack like images, and each image's
//! (frames, rows, cols) patch grid. Module names are transformers' (`patch_embed.proj`, `blocks.{i}.attn.qkv`, …).
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::Path;

use crate::error::{Error, Result};
use crate::zoo::layers::act::Act;
use crate::zoo::layers::{attention, float_tensor, rope};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2VitSpec {
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub in_channels: usize,
    pub act: Act,
    /// The LLM width the merger projects to (`vision_config.hidden_size`).
    pub out_hidden_size: usize,
    pub rope_theta: f64,
}

#[derive(Module, Debug)]
pub struct PatchEmbed3d {
    /// PyTorch's Conv3d layout [d, c, frames, p, p].
    pub weight: Param<Tensor<5>>,
}

#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: PatchEmbed3d,
}

#[derive(Module, Debug)]
pub struct VisionAttention {
    pub qkv: Linear,
    pub proj: Linear,
}

#[derive(Module, Debug)]
pub struct VisionMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    pub act: Act,
}

#[derive(Module, Debug)]
pub struct VisionBlock {
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub attn: VisionAttention,
    pub mlp: VisionMlp,
}

#[derive(Module, Debug)]
pub struct Qwen2Vit {
    pub patch_embed: PatchEmbed,
    pub blocks: Vec<VisionBlock>,
    #[module(skip)]
    pub spec: Qwen2VitSpec,
}

impl Qwen2VitSpec {
    pub fn from_hf(v: &Value, path: &Path, prefix: &str) -> Result<Self> {
        let get = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let need = |k: &str| {
            get(k)
                .ok_or_else(|| Error::key(path, format!("{prefix}{k}"), "missing or not a number"))
        };
        let act = crate::zoo::llms::config::parse_act(
            v.get("hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("quick_gelu"),
            path,
            &format!("{prefix}hidden_act"),
        )?;
        Ok(Qwen2VitSpec {
            depth: need("depth")?,
            embed_dim: need("embed_dim")?,
            num_heads: need("num_heads")?,
            mlp_ratio: v.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0),
            patch_size: get("patch_size").unwrap_or(14),
            temporal_patch_size: get("temporal_patch_size").unwrap_or(2),
            spatial_merge_size: get("spatial_merge_size").unwrap_or(2),
            in_channels: get("in_channels").or(get("in_chans")).unwrap_or(3),
            act,
            out_hidden_size: need("hidden_size")?,
            rope_theta: v
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
        })
    }

    pub fn to_hf(&self) -> Value {
        json!({
            "model_type": "qwen2_vl",
            "depth": self.depth,
            "embed_dim": self.embed_dim,
            "hidden_size": self.out_hidden_size,
            "hidden_act": self.act.hf_name(),
            // transformers 5.x types it as an int (released configs say 4)
            "mlp_ratio": if self.mlp_ratio.fract() == 0.0 { json!(self.mlp_ratio as u64) } else { json!(self.mlp_ratio) },
            "num_heads": self.num_heads,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "temporal_patch_size": self.temporal_patch_size,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads.max(1)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.depth == 0
            || self.embed_dim == 0
            || self.patch_size == 0
            || self.spatial_merge_size == 0
        {
            return Err("vision_config: depth, embed_dim, patch_size and spatial_merge_size must be positive".into());
        }
        if self.embed_dim % self.num_heads.max(1) != 0 || self.head_dim() % 4 != 0 {
            return Err(format!(
                "vision_config: embed_dim {} over {} heads must give a head size divisible by 4 (2-D rotary)",
                self.embed_dim, self.num_heads
            ));
        }
        Ok(())
    }

    pub fn init(&self, device: &Device) -> Qwen2Vit {
        let d = self.embed_dim;
        let ln = || LayerNormConfig::new(d).with_epsilon(1e-6).init(device);
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let hidden = (d as f64 * self.mlp_ratio) as usize;
        let (c, t, p) = (self.in_channels, self.temporal_patch_size, self.patch_size);
        Qwen2Vit {
            patch_embed: PatchEmbed {
                proj: PatchEmbed3d {
                    weight: Param::from_tensor(Tensor::random(
                        [d, c, t, p, p],
                        Distribution::Normal(0.0, 0.02),
                        device,
                    )),
                },
            },
            blocks: (0..self.depth)
                .map(|_| VisionBlock {
                    norm1: ln(),
                    norm2: ln(),
                    attn: VisionAttention {
                        qkv: lin(d, 3 * d),
                        proj: lin(d, d),
                    },
                    mlp: VisionMlp {
                        fc1: lin(d, hidden),
                        fc2: lin(hidden, d),
                        act: self.act,
                    },
                })
                .collect(),
            spec: self.clone(),
        }
    }

    /// cos/sin [1, 1, n, head_dim] for one frame's patches of a (rows × cols) grid, in the processor's block order:
    /// `head_dim / 4` frequencies rotate by the row, as many by the column, the whole repeated for both halves.
    fn rotary(
        &self,
        rows: usize,
        cols: usize,
        frames: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let hd = self.head_dim();
        let spatial = hd / 2;
        let inv: Vec<f32> = (0..spatial / 2)
            .map(|i| (1.0 / self.rope_theta.powf((2 * i) as f64 / spatial as f64)) as f32)
            .collect();
        let m = self.spatial_merge_size;
        let mut pos = vec![];
        for bi in 0..rows / m {
            for bj in 0..cols / m {
                for mi in 0..m {
                    for mj in 0..m {
                        pos.push((bi * m + mi, bj * m + mj));
                    }
                }
            }
        }
        let n = pos.len() * frames;
        let (mut cos, mut sin) = (Vec::with_capacity(n * hd), Vec::with_capacity(n * hd));
        for _ in 0..frames {
            for &(h, w) in &pos {
                for _half in 0..2 {
                    for axis in [h, w] {
                        for f in &inv {
                            let a = axis as f32 * f;
                            cos.push(a.cos());
                            sin.push(a.sin());
                        }
                    }
                }
            }
        }
        (
            float_tensor(cos, [1, 1, n, hd], device),
            float_tensor(sin, [1, 1, n, hd], device),
        )
    }
}

impl VisionBlock {
    /// x: [1, n, d] (one image) -> [1, n, d]
    fn forward(&self, x: Tensor<3>, heads: usize, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let hd = d / heads;
        let qkv = self
            .attn
            .qkv
            .forward(self.norm1.forward(x.clone()))
            .reshape([b, n, 3, heads, hd]);
        let part = |i: usize| {
            qkv.clone()
                .slice([0..b, 0..n, i..i + 1, 0..heads, 0..hd])
                .reshape([b, n, heads, hd])
                .swap_dims(1, 2)
        }; // [b, heads, n, hd]
        let q = rope::apply(part(0), cos, sin);
        let k = rope::apply(part(1), cos, sin);
        let o = attention::attend(q, k, part(2), None);
        let x = x + self.attn.proj.forward(o.swap_dims(1, 2).reshape([b, n, d]));
        let y = self.norm2.forward(x.clone());
        x + self
            .mlp
            .fc2
            .forward(self.mlp.act.forward(self.mlp.fc1.forward(y)))
    }
}

impl Qwen2Vit {
    /// Patches [N, c·frames, p, p] of images whose (frames, rows, cols) grids are `grids` (in order) -> the last
    /// block's output [N, embed_dim]; attention stays within each frame of each image (transformers' `cu_seqlens`).
    pub fn forward(&self, patches: Tensor<4>, grids: &[[usize; 3]]) -> Result<Tensor<2>> {
        let [n, cf, p, _] = patches.dims();
        let s = &self.spec;
        let want: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if want != n || cf != s.in_channels * s.temporal_patch_size || p != s.patch_size {
            return Err(Error::input(format!(
                "{n} patches of {cf}×{p}×{p} for grids {grids:?} ({want} patches of {}×{}×{} expected)",
                s.in_channels * s.temporal_patch_size,
                s.patch_size,
                s.patch_size
            )));
        }
        let device = patches.device();
        let d = s.embed_dim;
        let w = self.patch_embed.proj.weight.val().reshape([d, cf * p * p]);
        let x = patches.reshape([n, cf * p * p]).matmul(w.transpose()); // Conv3d with kernel = stride = patch
        let mut out = vec![];
        let mut start = 0;
        for &[frames, rows, cols] in grids {
            let per = rows * cols;
            let (cos, sin) = s.rotary(rows, cols, 1, &device);
            for _ in 0..frames {
                let mut h = x.clone().slice([start..start + per, 0..d]).unsqueeze::<3>();
                for blk in &self.blocks {
                    h = blk.forward(h, s.num_heads, &cos, &sin);
                }
                out.push(h.reshape([per, d]));
                start += per;
            }
        }
        Ok(Tensor::cat(out, 0))
    }
}
