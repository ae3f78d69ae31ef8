//! The LLaMA-style decoder: pre-RMSNorm blocks, grouped-query self-attention with rotary embeddings
//! (rotate_half), SwiGLU MLP, final RMSNorm and LM head (or tied embeddings). Follows transformers'
//! `modeling_llama.py` / `modeling_qwen2.py`. Field names are HF's, so checkpoint keys map one to one.
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{Bool, DType, Device, Int, Tensor};

use super::LlmSpec;
use crate::zoo::layers::mlp::GatedMlp;
use crate::zoo::layers::{attention, norm, precision, rope};

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
    pub layers: Vec<Option<LayerKv>>,
    pub key_valid: Vec<Vec<bool>>,
    /// Positions allocated beyond the first forward's (the tokens still to generate), so that decoding writes
    /// into the buffers without growing them.
    pub reserve: usize,
}

/// One layer's cached keys and values, [b, kv_heads, capacity, head_dim] with the first `len` positions filled.
/// A step writes its new positions in place (`slice_assign` on a buffer held once) and attends over a view of
/// the filled prefix, which burn-flex's attention reads without copying (vendor/burn-flex, `heads_in_place`):
/// a decode step costs its token, not a copy of the whole cache per layer as concatenating would.
#[derive(Debug, Clone)]
pub struct LayerKv {
    k: Tensor<4>,
    v: Tensor<4>,
    len: usize,
}

impl LayerKv {
    /// Appends k, v [b, kv_heads, t, head_dim] at the end of `slot` (allocating it, `reserve` positions beyond,
    /// on the first call; doubling it when full) and returns every key and value so far [b, kv_heads, len, hd].
    fn append(
        slot: &mut Option<LayerKv>,
        k: Tensor<4>,
        v: Tensor<4>,
        reserve: usize,
    ) -> (Tensor<4>, Tensor<4>) {
        let [b, kvh, t, hd] = k.dims();
        let len = slot.as_ref().map_or(0, |s| s.len);
        let end = len + t;
        let mut s = match slot.take() {
            Some(s) if s.k.dims()[2] >= end => s,
            old => {
                let cap = (end + reserve).max(2 * len);
                let buffer = |like: &Tensor<4>| {
                    let z = Tensor::<4>::zeros([b, kvh, cap, hd], &like.device());
                    if z.dtype() == like.dtype() {
                        z
                    } else {
                        z.cast(like.dtype())
                    }
                };
                let (mut kb, mut vb) = (buffer(&k), buffer(&v));
                if let Some(o) = old {
                    let filled = [0..b, 0..kvh, 0..len, 0..hd];
                    kb = kb.slice_assign(filled.clone(), o.k.slice(filled.clone()));
                    vb = vb.slice_assign(filled.clone(), o.v.slice(filled));
                }
                LayerKv { k: kb, v: vb, len }
            }
        };
        s.k = s.k.slice_assign([0..b, 0..kvh, len..end, 0..hd], k);
        s.v = s.v.slice_assign([0..b, 0..kvh, len..end, 0..hd], v);
        s.len = end;
        let filled = [0..b, 0..kvh, 0..end, 0..hd];
        let all = (s.k.clone().slice(filled.clone()), s.v.clone().slice(filled));
        *slot = Some(s);
        all
    }

    /// Keeps batch rows `idx`, in that order.
    pub fn select_rows(self, idx: Tensor<1, Int>) -> LayerKv {
        LayerKv {
            k: self.k.select(0, idx.clone()),
            v: self.v.select(0, idx),
            len: self.len,
        }
    }
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
    /// x: [b, t, d] -> [b, t, d]; `cache`: this layer's past keys/values (extended in place) and the positions to reserve when it is allocated.
    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &Tensor<4, Bool>,
        cache: Option<(&mut Option<LayerKv>, usize)>,
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
        if let Some((slot, reserve)) = cache {
            (k, v) = LayerKv::append(slot, k, v, reserve);
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
        cache: Option<(&mut Option<LayerKv>, usize)>,
    ) -> Tensor<3> {
        let a = self.self_attn.forward(
            norm::rms(&self.input_layernorm, h.clone()),
            &ctx.cos,
            &ctx.sin,
            &ctx.mask,
            cache,
        );
        let h = h + a;
        h.clone()
            + self
                .mlp
                .forward(norm::rms(&self.post_attention_layernorm, h))
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
            let slot = cache.as_deref_mut().map(|c| (&mut c.layers[i], c.reserve));
            h = layer.forward(h, &ctx, slot);
        }
        norm::rms(&self.norm, h)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::llms::LlmFamily;
    use crate::zoo::presets;

    /// Decoding token by token through the cache (a prompt of 5, then 7 single steps: with no reserve the buffers
    /// grow 5 → 10 → 20, their filled prefix copied over) gives the full forward's hidden states, row by row with
    /// a left-padded row.
    #[test]
    fn cached_steps_equal_the_full_forward() {
        let device = Device::flex();
        device.seed(11);
        let spec = presets::llm("bench-tiny", LlmFamily::Llama, 64).unwrap();
        let model = spec.init(&device);
        let (b, t0, steps) = (2, 5, 7);
        let t = t0 + steps;
        let all: Vec<i64> = (0..b * t).map(|i| (i * 13 % 61) as i64 + 1).collect();
        let ids = |r: std::ops::Range<usize>| -> Tensor<2, Int> {
            let v: Vec<i64> = (0..b)
                .flat_map(|row| r.clone().map(|i| all[row * t + i]).collect::<Vec<_>>())
                .collect();
            Tensor::from_data(burn::tensor::TensorData::new(v, [b, r.len()]), &device)
        };
        // row 1 left-padded by two positions
        let valid: Vec<Vec<bool>> = (0..b)
            .map(|row| (0..t).map(|i| row == 0 || i >= 2).collect())
            .collect();
        let positions = |r: std::ops::Range<usize>| -> Vec<Vec<i64>> {
            (0..b)
                .map(|row| {
                    r.clone()
                        .map(|i| i as i64 - if row == 1 { 2 } else { 0 })
                        .map(|p| p.max(0))
                        .collect()
                })
                .collect()
        };
        let full =
            model.forward_embeds(model.embed(ids(0..t)), &positions(0..t), &valid, None, None);
        let mut cache = KvCache::default();
        let mut got = vec![model.forward_embeds(
            model.embed(ids(0..t0)),
            &positions(0..t0),
            &valid.iter().map(|v| v[..t0].to_vec()).collect::<Vec<_>>(),
            None,
            Some(&mut cache),
        )];
        for i in t0..t {
            let kv: Vec<Vec<bool>> = valid.iter().map(|v| v[..=i].to_vec()).collect();
            got.push(model.forward_embeds(
                model.embed(ids(i..i + 1)),
                &positions(i..i + 1),
                &kv,
                None,
                Some(&mut cache),
            ));
        }
        assert_eq!(cache.layers[0].as_ref().unwrap().k.dims()[2], 20);
        let (full, got) = (
            crate::zoo::layers::to_vec(full),
            crate::zoo::layers::to_vec(Tensor::cat(got, 1)),
        );
        let d = spec.hidden_size;
        for row in 0..b {
            for i in (if row == 1 { 2 } else { 0 })..t {
                for k in 0..d {
                    let (x, y) = (full[(row * t + i) * d + k], got[(row * t + i) * d + k]);
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                        "row {row} position {i}: {x} vs {y}"
                    );
                }
            }
        }
    }
}
