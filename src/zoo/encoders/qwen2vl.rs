//! Qwen2-VL's vision transformer (transformers `modeling_qwen2_vl.py`; Wang et al. 2024, "native dynamic
//! resolution"): an image keeps (about) its own size, so its patch count varies. Patches are 14 px (here any
//! `patch_size`) × `temporal_patch_size` frames (a still image is two equal frames), embedded by a Conv3d whose kernel
//! is the patch; blocks are pre-LN (LayerNorm eps 1e-6) with a fused `qkv` projection, 2-D rotary embeddings (half
//! the rotated frequencies follow the patch's row, half its column) and full attention within one image; the
//! 2×2 patch merger that follows is the connector (`zoo::connectors::merger`).
//!
//! Qwen2.5-VL (`modeling_qwen2_5_vl.py`) keeps the design with RMSNorm, a SwiGLU MLP with biases, and window
//! attention: every block but the `fullatt_block_indexes` ones attends only within windows of `window_size`
//! pixels (window_size / merge / patch merged tokens per side), the tokens reordered window by window
//! (transformers' `window_index`) and restored after the last block.
//!
//! Inputs: the processor's patches in its order (each 2×2 merge block's four patches consecutive, see
//! `data::images`), as [patches, channels·frames, p, p] so batches stack like images, and each image's
//! (frames, rows, cols) patch grid. Module names are transformers' (`patch_embed.proj`, `blocks.{i}.attn.qkv`, …).
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::{Module, Param};
use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::Path;

use crate::error::{Error, Result};
use crate::zoo::layers::act::Act;
use crate::zoo::layers::mlp::GatedMlp;
use crate::zoo::layers::norm::Norm;
use crate::zoo::layers::{attention, float_tensor, int_tensor, rope};

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
    /// Qwen2.5-VL: the SwiGLU width (RMSNorm and window attention come with it).
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// Qwen2.5-VL: window side in pixels.
    #[serde(default)]
    pub window_size: Option<usize>,
    /// Qwen2.5-VL: the blocks that attend over the whole image.
    #[serde(default)]
    pub fullatt_blocks: Vec<usize>,
    /// Qwen2.5-VL: temporal position units per second of video.
    #[serde(default)]
    pub tokens_per_second: Option<f64>,
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
pub struct PlainMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    pub act: Act,
}

/// Qwen2-VL's fc1 → act → fc2, or Qwen2.5-VL's SwiGLU (`gate_proj`, `up_proj`, `down_proj`).
#[derive(Module, Debug)]
pub enum VisionMlp {
    Plain(PlainMlp),
    Gated(GatedMlp),
}

#[derive(Module, Debug)]
pub struct VisionBlock {
    pub norm1: Norm,
    pub norm2: Norm,
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
        let theta = v
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        if matches!(
            v.get("model_type").and_then(Value::as_str),
            Some("qwen2_5_vl" | "qwen2_5_vl_vision")
        ) {
            let act = crate::zoo::llms::config::parse_act(
                v.get("hidden_act")
                    .and_then(Value::as_str)
                    .unwrap_or("silu"),
                path,
                &format!("{prefix}hidden_act"),
            )?;
            return Ok(Qwen2VitSpec {
                depth: need("depth")?,
                embed_dim: need("hidden_size")?,
                num_heads: need("num_heads")?,
                mlp_ratio: 0.0,
                patch_size: get("patch_size").unwrap_or(14),
                temporal_patch_size: get("temporal_patch_size").unwrap_or(2),
                spatial_merge_size: get("spatial_merge_size").unwrap_or(2),
                in_channels: get("in_channels").or(get("in_chans")).unwrap_or(3),
                act,
                out_hidden_size: need("out_hidden_size")?,
                rope_theta: theta,
                intermediate_size: Some(need("intermediate_size")?),
                window_size: Some(get("window_size").unwrap_or(112)),
                fullatt_blocks: v
                    .get("fullatt_block_indexes")
                    .and_then(|x| serde_json::from_value(x.clone()).ok())
                    .unwrap_or_else(|| vec![7, 15, 23, 31]),
                tokens_per_second: v.get("tokens_per_second").and_then(Value::as_f64),
            });
        }
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
            rope_theta: theta,
            intermediate_size: None,
            window_size: None,
            fullatt_blocks: vec![],
            tokens_per_second: None,
        })
    }

    /// Qwen2.5-VL's tower (RMSNorm, SwiGLU, window attention).
    pub fn is_v25(&self) -> bool {
        self.window_size.is_some()
    }

    pub fn to_hf(&self) -> Value {
        if self.is_v25() {
            return json!({
                "model_type": "qwen2_5_vl",
                "depth": self.depth,
                "hidden_size": self.embed_dim,
                "out_hidden_size": self.out_hidden_size,
                "intermediate_size": self.intermediate_size,
                "hidden_act": self.act.hf_name(),
                "num_heads": self.num_heads,
                "in_channels": self.in_channels,
                "patch_size": self.patch_size,
                "spatial_merge_size": self.spatial_merge_size,
                "temporal_patch_size": self.temporal_patch_size,
                "window_size": self.window_size,
                "fullatt_block_indexes": self.fullatt_blocks,
                "tokens_per_second": self.tokens_per_second.map(|t| t as u64),
            });
        }
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
        let ln = || Norm::new(d, 1e-6, self.is_v25(), device);
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let hidden = (d as f64 * self.mlp_ratio) as usize;
        let mlp = || match self.intermediate_size {
            Some(f) => VisionMlp::Gated(GatedMlp::new(d, f, d, true, self.act, device)),
            None => VisionMlp::Plain(PlainMlp {
                fc1: lin(d, hidden),
                fc2: lin(hidden, d),
                act: self.act,
            }),
        };
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
                    mlp: mlp(),
                })
                .collect(),
            spec: self.clone(),
        }
    }

    /// Qwen2.5-VL's window order for one frame of a (rows × cols) patch grid (transformers'
    /// `get_vision_window_index`): the merged tokens window by window (windows row-major over the padded grid,
    /// tokens row-major inside), and each non-empty window's token count.
    fn windows(&self, rows: usize, cols: usize) -> (Vec<usize>, Vec<usize>) {
        let m = self.spatial_merge_size;
        let (lh, lw) = (rows / m, cols / m);
        let win = (self.window_size.unwrap_or(0) / m / self.patch_size).max(1);
        let (nh, nw) = ((lh + win - lh % win) / win, (lw + win - lw % win) / win);
        let (mut order, mut lens) = (vec![], vec![]);
        for wi in 0..nh {
            for wj in 0..nw {
                let before = order.len();
                for i in wi * win..(wi + 1) * win {
                    for j in wj * win..(wj + 1) * win {
                        if i < lh && j < lw {
                            order.push(i * lw + j);
                        }
                    }
                }
                if order.len() > before {
                    lens.push(order.len() - before);
                }
            }
        }
        (order, lens)
    }

    /// cos/sin [1, 1, n, head_dim] for one frame's patches of a (rows × cols) grid, in the processor's block order
    /// (or `order` of it: Qwen2.5-VL's windows): `head_dim / 4` frequencies rotate by the row, as many by the
    /// column, the whole repeated for both halves.
    fn rotary(
        &self,
        rows: usize,
        cols: usize,
        frames: usize,
        order: Option<&[usize]>,
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
        if let Some(o) = order {
            pos = o.iter().map(|&i| pos[i]).collect();
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
    /// x: [1, n, d] (one image) -> [1, n, d]; `mask`: Qwen2.5-VL's windows (true = masked).
    fn forward(
        &self,
        x: Tensor<3>,
        heads: usize,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: Option<&Tensor<4, Bool>>,
    ) -> Tensor<3> {
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
        let o = attention::attend(q, k, part(2), mask);
        let x = x + self.attn.proj.forward(o.swap_dims(1, 2).reshape([b, n, d]));
        let y = self.norm2.forward(x.clone());
        x + match &self.mlp {
            VisionMlp::Plain(m) => m.fc2.forward(m.act.forward(m.fc1.forward(y))),
            VisionMlp::Gated(m) => m.forward(y),
        }
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
            // Qwen2.5-VL: patches reordered window by window (merge blocks stay whole), a block-diagonal mask
            // over the windows, the inverse order restored at the end
            let m2 = s.spatial_merge_size * s.spatial_merge_size;
            let window = s.is_v25().then(|| {
                let (blocks, lens) = s.windows(rows, cols);
                let order: Vec<usize> = blocks.iter().flat_map(|&k| k * m2..(k + 1) * m2).collect();
                let mut seg = Vec::with_capacity(per);
                for (w, &l) in lens.iter().enumerate() {
                    seg.extend(std::iter::repeat_n(w, l * m2));
                }
                let mask: Vec<bool> = (0..per * per)
                    .map(|i| seg[i / per] != seg[i % per])
                    .collect();
                let mask: Tensor<4, Bool> =
                    Tensor::from_data(TensorData::new(mask, [1, 1, per, per]), &device);
                let mut inverse = vec![0; per];
                for (new, &old) in order.iter().enumerate() {
                    inverse[old] = new;
                }
                (order, inverse, mask)
            });
            let order = window.as_ref().map(|w| w.0.as_slice());
            let (cos, sin) = s.rotary(rows, cols, 1, order, &device);
            for _ in 0..frames {
                let mut h = x.clone().slice([start..start + per, 0..d]);
                if let Some((order, _, _)) = &window {
                    let idx = order.iter().map(|&i| i as i64).collect();
                    h = h.select(0, int_tensor(idx, [per], &device));
                }
                let mut h = h.unsqueeze::<3>();
                for (i, blk) in self.blocks.iter().enumerate() {
                    let mask = window
                        .as_ref()
                        .filter(|_| !s.fullatt_blocks.contains(&i))
                        .map(|w| &w.2);
                    h = blk.forward(h, s.num_heads, &cos, &sin, mask);
                }
                let mut h = h.reshape([per, d]);
                if let Some((_, inverse, _)) = &window {
                    let idx = inverse.iter().map(|&i| i as i64).collect();
                    h = h.select(0, int_tensor(idx, [per], &device));
                }
                out.push(h);
                start += per;
            }
        }
        Ok(Tensor::cat(out, 0))
    }
}
