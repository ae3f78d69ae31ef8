//! The BLIP vision tower of BLIP-2 and InstructBLIP (Li et al. 2023, Dai et al. 2023; transformers
//! `Blip2VisionModel`, `InstructBlipVisionModel`; EVA-CLIP's ViT-g in the released models): a pre-LN ViT like
//! CLIP's but with a fused `qkv` projection (bias (q, 0, v) as released), an `projection` output, a patch conv with
//! bias, a CLS token and position table stored as [1, n, d] parameters, no pre-layernorm, and `post_layernorm` —
//! which BLIP-2/InstructBLIP apply to the features they hand the Q-Former (their `last_hidden_state`, every
//! token). Module names are transformers'.
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};
use crate::zoo::layers::act::Act;
use crate::zoo::layers::{attention, patch, precision};
use crate::zoo::llms::config::parse_act;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlipSpec {
    /// `blip_2_vision_model` or `instructblip_vision_model` (written back as read).
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub input_size: usize,
    pub layer_norm_eps: f64,
    pub act: Act,
    pub qkv_bias: bool,
}

#[derive(Deserialize)]
struct HfBlip {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    patch_size: usize,
    image_size: usize,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
    #[serde(default = "gelu")]
    hidden_act: String,
    #[serde(default = "yes")]
    qkv_bias: bool,
}
fn eps() -> f64 {
    1e-6
}
fn gelu() -> String {
    "gelu".into()
}
fn yes() -> bool {
    true
}

impl BlipSpec {
    pub fn from_hf(v: &serde_json::Value, path: &Path, prefix: &str) -> Result<Self> {
        let c: HfBlip = serde_json::from_value(v.clone()).map_err(|e| {
            Error::key(
                path,
                prefix.trim_end_matches('.'),
                format!("not a BLIP vision config: {e}"),
            )
        })?;
        if c.image_size % c.patch_size != 0 {
            return Err(Error::key(
                path,
                format!("{prefix}image_size"),
                "image_size must be a multiple of patch_size",
            ));
        }
        Ok(BlipSpec {
            model_type: c.model_type,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            patch_size: c.patch_size,
            image_size: c.image_size,
            input_size: c.image_size,
            layer_norm_eps: c.layer_norm_eps,
            act: parse_act(&c.hidden_act, path, &format!("{prefix}hidden_act"))?,
            qkv_bias: c.qkv_bias,
        })
    }

    pub fn to_hf(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.act.hf_name(),
            "qkv_bias": self.qkv_bias,
        })
    }

    pub fn hf_architecture(&self) -> &'static str {
        if self.model_type == "instructblip_vision_model" {
            "InstructBlipVisionModel"
        } else {
            "Blip2VisionModel"
        }
    }

    pub fn grid(&self) -> usize {
        self.input_size / self.patch_size
    }

    pub fn init(&self, device: &Device) -> BlipVision {
        let d = self.hidden_size;
        let p = self.patch_size;
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let lin = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        let n_pos = (self.image_size / p).pow(2) + 1;
        let normal = |shape: [usize; 3]| {
            Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.02),
                device,
            ))
        };
        BlipVision {
            embeddings: BlipEmbeddings {
                class_embedding: normal([1, 1, d]),
                patch_embedding: BlipPatch {
                    weight: Param::from_tensor(Tensor::random(
                        [d, 3, p, p],
                        Distribution::Normal(0.0, 0.02),
                        device,
                    )),
                    bias: Param::from_tensor(Tensor::zeros([d], device)),
                },
                position_embedding: normal([1, n_pos, d]),
            },
            encoder: BlipEncoder {
                layers: (0..self.num_layers)
                    .map(|_| BlipLayer {
                        self_attn: BlipAttention {
                            qkv: lin(d, 3 * d, self.qkv_bias),
                            projection: lin(d, d, true),
                            heads: self.num_heads,
                        },
                        layer_norm1: ln(),
                        mlp: BlipMlp {
                            fc1: lin(d, self.intermediate_size, true),
                            fc2: lin(self.intermediate_size, d, true),
                            act: self.act,
                        },
                        layer_norm2: ln(),
                    })
                    .collect(),
            },
            post_layernorm: ln(),
            spec: self.clone(),
        }
    }
}

#[derive(Module, Debug)]
pub struct BlipPatch {
    /// [d, 3, p, p]
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
}

#[derive(Module, Debug)]
pub struct BlipEmbeddings {
    /// [1, 1, d]
    pub class_embedding: Param<Tensor<3>>,
    pub patch_embedding: BlipPatch,
    /// [1, 1 + patches, d]
    pub position_embedding: Param<Tensor<3>>,
}

#[derive(Module, Debug)]
pub struct BlipAttention {
    /// [d] -> [3d]: q, k, v in that order
    pub qkv: Linear,
    pub projection: Linear,
    #[module(skip)]
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct BlipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    pub act: Act,
}

#[derive(Module, Debug)]
pub struct BlipLayer {
    pub self_attn: BlipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: BlipMlp,
    pub layer_norm2: LayerNorm,
}

#[derive(Module, Debug)]
pub struct BlipEncoder {
    pub layers: Vec<BlipLayer>,
}

#[derive(Module, Debug)]
pub struct BlipVision {
    pub embeddings: BlipEmbeddings,
    pub encoder: BlipEncoder,
    pub post_layernorm: LayerNorm,
    #[module(skip)]
    pub spec: BlipSpec,
}

impl BlipLayer {
    /// x: [n, t, d] -> [n, t, d]
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, t, d] = x.dims();
        let h = self.self_attn.heads;
        let y = self.layer_norm1.forward(x.clone());
        // [n, t, 3d] -> [3, n, h, t, hd] as transformers' reshape(…, 3, heads, hd).permute(2, 0, 3, 1, 4)
        let qkv = self
            .self_attn
            .qkv
            .forward(y)
            .reshape([n, t, 3, h, d / h])
            .permute([2, 0, 3, 1, 4]);
        let part = |i: usize| {
            qkv.clone()
                .slice([i..i + 1, 0..n, 0..h, 0..t, 0..d / h])
                .reshape([n, h, t, d / h])
        };
        let o = attention::attend(part(0), part(1), part(2), None);
        let x = x + self
            .self_attn
            .projection
            .forward(o.swap_dims(1, 2).reshape([n, t, d]));
        let y = self.layer_norm2.forward(x.clone());
        // the feed-forward in bf16 inside an autocast scope
        x + precision::within(y, |y| {
            self.mlp
                .fc2
                .forward(self.mlp.act.forward(self.mlp.fc1.forward(y)))
        })
    }
}

impl BlipVision {
    /// pixels [n, 3, s, s] -> embedding output [n, 1 + patches, d] (positions interpolated bicubically for other
    /// resolutions, as `interpolate_pos_encoding`).
    pub fn embed(&self, pixels: Tensor<4>) -> Tensor<3> {
        let [n, _, hh, ww] = pixels.dims();
        let p = self.spec.patch_size;
        let d = self.spec.hidden_size;
        let conv = &self.embeddings.patch_embedding;
        let x = patch::embed_patches(pixels, conv.weight.val(), Some(conv.bias.val()), p);
        let cls = self.embeddings.class_embedding.val().expand([n, 1, d]);
        let table = self.embeddings.position_embedding.val();
        let [_, n_pos, _] = table.dims();
        let pos = patch::resize_positions(table.reshape([n_pos, d]), 1, hh / p, ww / p);
        Tensor::cat(vec![cls, x], 1) + pos.unsqueeze::<3>()
    }

    pub fn hidden_states(&self, pixels: Tensor<4>, last: usize) -> Vec<Tensor<3>> {
        patch::hidden_states(
            self.embed(pixels),
            &self.encoder.layers,
            last,
            |l: &BlipLayer, x| l.forward(x),
        )
    }

    /// last_hidden_state: all layers, then `post_layernorm` — what BLIP-2/InstructBLIP feed the Q-Former.
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        let mut s = self.hidden_states(pixels, self.spec.num_layers);
        self.post_layernorm.forward(s.pop().unwrap())
    }
}
