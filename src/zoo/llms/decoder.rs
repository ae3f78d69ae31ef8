//! The LLaMA-style decoder: pre-RMSNorm blocks, grouped-query self-attention with rotary embeddings
//! (rotate_half), SwiGLU MLP, final RMSNorm and LM head (or tied embeddings). Follows transformers'
//! `modeling_llama.py` / `modeling_qwen2.py`. Field names are HF's, so checkpoint keys map one to one.
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{Bool, DType, Device, Int, Tensor};

use super::LlmSpec;
use crate::zoo::layers::mlp::GatedMlp;
use crate::zoo::layers::{attention, precision, rope};

#[derive(Module, Debug)]
pub struct SelfAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: SelfAttention,
    pub mlp: GatedMlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// None when the LM head is tied to the input embeddings (Qwen2-small, `tie_word_embeddings`).
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub spec: LlmSpec,
}

/// Per-layer keys and values of everything seen so far, for incremental decoding.
/// `key_valid[b][k]` says whether cached position k of row b is a real token (false for padding).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    pub key_valid: Vec<Vec<bool>>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.key_valid.first().map_or(0, |r| r.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

impl LlmSpec {
    pub fn init(&self, device: &Device) -> Decoder {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let norm = || {
            RmsNormConfig::new(d)
                .with_epsilon(self.rms_norm_eps)
                .init(device)
        };
        let layers = (0..self.num_layers)
            .map(|_| DecoderLayer {
                self_attn: SelfAttention {
                    q_proj: linear(d, q, self.qkv_bias, device),
                    k_proj: linear(d, kv, self.qkv_bias, device),
                    v_proj: linear(d, kv, self.qkv_bias, device),
                    o_proj: linear(q, d, self.o_bias, device),
                    num_heads: self.num_heads,
                    num_kv_heads: self.num_kv_heads,
                    head_dim: self.head_dim,
                },
                mlp: GatedMlp::new(d, f, d, self.mlp_bias, self.act, device),
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
            })
            .collect();
        Decoder {
            embed_tokens: EmbeddingConfig::new(self.vocab_size, d).init(device),
            layers,
            norm: norm(),
            lm_head: (!self.tie_word_embeddings).then(|| linear(d, self.vocab_size, false, device)),
            spec: self.clone(),
        }
    }
}

impl SelfAttention {
    /// x: [b, t, d] -> [b, t, d]; `cache` holds this layer's past keys/values and is extended.
    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &Tensor<4, Bool>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [b, t, h*hd] -> [b, h, t, hd]
        let q = self
            .q_proj
            .forward(x.clone())
            .reshape([b, t, h, hd])
            .swap_dims(1, 2);
        let k = self
            .k_proj
            .forward(x.clone())
            .reshape([b, t, kvh, hd])
            .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, t, kvh, hd])
            .swap_dims(1, 2);
        let q = rope::apply(q, cos, sin);
        let mut k = rope::apply(k, cos, sin);
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let o = attention::attend_grouped(q, k, v, mask); // [b, h, t, hd]
        self.o_proj
            .forward(o.swap_dims(1, 2).reshape([b, t, h * hd]))
    }
}

/// Rotary tables [b, 1, t, head_dim] and mask [b, 1, t, t_keys] of one forward pass (`Decoder::context`).
#[derive(Clone)]
pub struct LayerContext {
    pub cos: Tensor<4>,
    pub sin: Tensor<4>,
    pub mask: Tensor<4, Bool>,
}

impl LayerContext {
    /// The same tables and mask on the inner (non-autodiff) backend.
    pub fn inner(&self) -> LayerContext {
        LayerContext {
            cos: self.cos.clone().inner(),
            sin: self.sin.clone().inner(),
            mask: self.mask.clone().inner(),
        }
    }
}

impl DecoderLayer {
    /// Pre-norm attention and MLP with their residuals: h [b, t, d] -> [b, t, d]; `cache` as in `SelfAttention`.
    pub fn forward(
        &self,
        h: Tensor<3>,
        ctx: &LayerContext,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<3> {
        let a = self.self_attn.forward(
            self.input_layernorm.forward(h.clone()),
            &ctx.cos,
            &ctx.sin,
            &ctx.mask,
            cache,
        );
        let h = h + a;
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

impl Decoder {
    /// ids: [b, t] -> [b, t, d]
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        // a frozen table may be stored in bf16 (`frozen_dtype`); activations are f32
        precision::to(self.embed_tokens.forward(ids), DType::F32)
    }

    /// Runs the blocks and final norm over input embeddings.
    /// x: [b, t, d]; `positions[b][i]`: rotary position of token i; `key_valid[b][k]`: whether key k (past and new)
    /// is a real token; `segments` (packed rows, no cache): tokens attend within their own sample only. Returns
    /// hidden states [b, t, d].
    pub fn forward_embeds(
        &self,
        x: Tensor<3>,
        positions: &[Vec<i64>],
        key_valid: &[Vec<bool>],
        segments: Option<&[Vec<u32>]>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let ctx = self.context(&x, positions, key_valid, segments);
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.layers.len() {
                c.layers = vec![None; self.layers.len()];
            }
            c.key_valid = key_valid.to_vec();
        }
        let mut h = x;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = layer.forward(h, &ctx, slot);
        }
        self.norm.forward(h)
    }

    /// What every layer of one forward pass shares: the rotary tables for `positions` and the attention mask
    /// (causal, padding, packed segments) on x's device.
    pub fn context(
        &self,
        x: &Tensor<3>,
        positions: &[Vec<i64>],
        key_valid: &[Vec<bool>],
        segments: Option<&[Vec<u32>]>,
    ) -> LayerContext {
        let device = x.device();
        let [b, t, _] = x.dims();
        let (cos, sin) = self.spec.rope.tables_for(positions, b, &device);
        let mask = attention::build_mask(key_valid, t, true, segments, &device);
        LayerContext { cos, sin, mask }
    }

    /// hidden: [b, t, d] -> logits [b, t, vocab]
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let w = self.embed_tokens.weight.val(); // [vocab, d]
                precision::matmul_bias(hidden, w.transpose(), None)
            }
        }
    }
}
