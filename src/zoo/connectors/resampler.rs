//! Perceiver resampler (Flamingo, Alayrac et al. 2022) as Idefics2 has it (transformers `Idefics2Connector`):
//! the features are first projected to the LLM width by a gated MLP (`modality_projection`: down(act(gate(x)) ·
//! up(x)), intermediate = the LLM's intermediate size), then `latents` learnable queries pass `depth` perceiver
//! layers — RMSNorm on latents and context, attention whose queries are the latents and whose keys/values are
//! [context; latents] (grouped-query heads), residual, RMSNorm, gated MLP (4× width), residual — and a final
//! RMSNorm. Output: `latents` tokens per image whatever the encoder's grid. Module names are transformers', so
//! `multi_modal_projector.perceiver_resampler.layers.0.self_attn.q_proj.weight` is
//! `model.connector.perceiver_resampler.layers.0.self_attn.q_proj.weight` of an Idefics2 checkpoint.
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::{Module, Param};
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::Features;
use crate::zoo::layers::act::Act;
use crate::zoo::layers::attention::{attend, repeat_kv};
use crate::zoo::layers::mlp::GatedMlp;
use crate::zoo::llms::LlmSpec;

/// Idefics2's `perceiver_config`, with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResamplerSpec {
    /// Learnable queries = image tokens per image (`resampler_n_latents`).
    #[serde(default = "latents")]
    pub latents: usize,
    /// Perceiver layers (`resampler_depth`).
    #[serde(default = "depth")]
    pub depth: usize,
    /// Attention heads (`resampler_n_heads`).
    #[serde(default = "heads")]
    pub heads: usize,
    /// Key/value heads (`num_key_value_heads`).
    #[serde(default = "kv_heads")]
    pub kv_heads: usize,
    /// Per-head width (`resampler_head_dim`); default: the LLM width / heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Activation of the gated MLPs (`hidden_act`).
    #[serde(default = "silu")]
    pub act: Act,
}
fn latents() -> usize {
    64
}
fn depth() -> usize {
    3
}
fn heads() -> usize {
    16
}
fn kv_heads() -> usize {
    4
}
fn silu() -> Act {
    Act::Silu
}

#[derive(Module, Debug)]
pub struct PerceiverAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// (heads, kv heads, head dim)
    #[module(skip)]
    pub heads: (usize, usize, usize),
}

#[derive(Module, Debug)]
pub struct PerceiverLayer {
    pub input_latents_norm: RmsNorm,
    pub input_context_norm: RmsNorm,
    pub self_attn: PerceiverAttention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: GatedMlp,
}

#[derive(Module, Debug)]
pub struct Perceiver {
    /// [latents, d]
    pub latents: Param<Tensor<2>>,
    pub layers: Vec<PerceiverLayer>,
    pub norm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct Resampler {
    pub modality_projection: GatedMlp,
    pub perceiver_resampler: Perceiver,
}

fn linear(i: usize, o: usize, device: &Device) -> Linear {
    LinearConfig::new(i, o).with_bias(false).init(device)
}

/// `Idefics2MLP`: the gated feed-forward without biases.
fn gated(d_in: usize, d_mid: usize, d_out: usize, act: Act, device: &Device) -> GatedMlp {
    GatedMlp::new(d_in, d_mid, d_out, false, act, device)
}

impl ResamplerSpec {
    pub fn head_dim(&self, d: usize) -> usize {
        self.head_dim.unwrap_or(d / self.heads.max(1))
    }

    pub fn out_tokens(&self, _f: &Features) -> Result<usize, String> {
        if self.latents == 0 {
            return Err(
                "connector resampler: latents must be at least 1 (they are the image tokens)"
                    .into(),
            );
        }
        if self.depth == 0 {
            return Err("connector resampler: depth must be at least 1".into());
        }
        if self.heads == 0 || self.kv_heads == 0 || self.heads % self.kv_heads != 0 {
            return Err(format!(
                "connector resampler: heads = {} must be a positive multiple of kv_heads = {}",
                self.heads, self.kv_heads
            ));
        }
        Ok(self.latents)
    }

    pub fn init(&self, f: &Features, llm: &LlmSpec, device: &Device) -> Resampler {
        let d = llm.hidden_size;
        let hd = self.head_dim(d);
        let norm = || {
            RmsNormConfig::new(d)
                .with_epsilon(llm.rms_norm_eps)
                .init(device)
        };
        Resampler {
            modality_projection: gated(f.width, llm.intermediate_size, d, llm.act, device),
            perceiver_resampler: Perceiver {
                // transformers starts the latents at ones; identical queries would stay identical under training
                // (every latent gets the same gradient), so a fresh resampler draws them.
                latents: Param::from_tensor(Tensor::random(
                    [self.latents, d],
                    Distribution::Normal(0.0, 1.0),
                    device,
                )),
                layers: (0..self.depth)
                    .map(|_| PerceiverLayer {
                        input_latents_norm: norm(),
                        input_context_norm: norm(),
                        self_attn: PerceiverAttention {
                            q_proj: linear(d, self.heads * hd, device),
                            k_proj: linear(d, self.kv_heads * hd, device),
                            v_proj: linear(d, self.kv_heads * hd, device),
                            o_proj: linear(self.heads * hd, d, device),
                            heads: (self.heads, self.kv_heads, hd),
                        },
                        post_attention_layernorm: norm(),
                        mlp: gated(d, 4 * d, d, self.act, device),
                    })
                    .collect(),
                norm: norm(),
            },
        }
    }
}

impl PerceiverAttention {
    /// latents: [n, q, d], context: [n, c, d] -> [n, q, d]; keys and values over [context; latents], no mask
    /// (every feature of an image is valid).
    fn forward(&self, latents: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let [n, q, _] = latents.dims();
        let (h, kvh, hd) = self.heads;
        let kv_in = Tensor::cat(vec![context, latents.clone()], 1);
        let tk = kv_in.dims()[1];
        let split =
            |x: Tensor<3>, heads: usize, t: usize| x.reshape([n, t, heads, hd]).swap_dims(1, 2);
        let qh = split(self.q_proj.forward(latents), h, q); // [n, h, q, hd]
        let kh = repeat_kv(split(self.k_proj.forward(kv_in.clone()), kvh, tk), h / kvh);
        let vh = repeat_kv(split(self.v_proj.forward(kv_in), kvh, tk), h / kvh);
        let o = attend(qh, kh, vh, None); // [n, h, q, hd]
        self.o_proj
            .forward(o.swap_dims(1, 2).reshape([n, q, h * hd]))
    }
}

impl PerceiverLayer {
    fn forward(&self, latents: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let l = self.input_latents_norm.forward(latents.clone());
        let c = self.input_context_norm.forward(context);
        let x = latents + self.self_attn.forward(l, c);
        let y = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        x + y
    }
}

impl Resampler {
    /// x: [n, tokens, width] -> [n, latents, d_llm]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let context = self.modality_projection.forward(x);
        let n = context.dims()[0];
        let p = &self.perceiver_resampler;
        let [q, d] = p.latents.dims();
        let mut lat = p.latents.val().unsqueeze::<3>().expand([n, q, d]);
        for layer in &p.layers {
            lat = layer.forward(lat, context.clone());
        }
        p.norm.forward(lat)
    }
}
