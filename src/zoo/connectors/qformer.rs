//! Q-Former connector (BLIP-2, Li et al. 2023; transformers `Blip2QFormerModel` inside
//! `Blip2ForConditionalGeneration`): `queries` learnable query embeddings pass a BERT-style post-LN transformer —
//! self-attention over the queries, cross-attention to the image features in every `cross_attention_frequency`-th
//! layer (layer 0 first), the query feed-forward (`intermediate_query` / `output_query`) — then
//! `language_projection` to the LLM width. Output: `queries` tokens per image whatever the encoder's grid
//! (BLIP-2 / InstructBLIP use 32). Module names are transformers': `multi_modal_projector.query_tokens`,
//! `multi_modal_projector.qformer.encoder.layer.0.crossattention.attention.key.weight`, … are BLIP-2's top-level
//! `query_tokens`, `qformer.*`, `language_projection.*`.
//! With `instruction` set it is InstructBLIP's instruction-aware Q-Former (`InstructBlipQFormerModel`): the
//! instruction's tokens (the Q-Former's own BERT vocabulary) are embedded (`embeddings.word_embeddings` +
//! `position_embeddings`, `embeddings.layernorm` in place of BLIP-2's `layernorm`) and join the queries in every
//! self-attention (padding keys masked); only the queries cross-attend to the image; the text tokens take their own
//! feed-forward (`intermediate` / `output`); the queries' outputs are projected.
#![allow(non_snake_case)] // `LayerNorm` is BERT's module name, kept so the key table stays the identity

use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::tensor::{Bool, DType, Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::Features;
use crate::zoo::layers::act::Act;
use crate::zoo::layers::attention::{attend, build_mask};
use crate::zoo::layers::{int_tensor, precision};
use crate::zoo::llms::LlmSpec;

/// BLIP-2's `qformer_config` (+ `num_query_tokens`), small defaults for a fresh connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QFormerSpec {
    /// Learnable queries = image tokens per image (`num_query_tokens`; BLIP-2: 32).
    #[serde(default = "queries")]
    pub queries: usize,
    /// Q-Former width (`hidden_size`; BLIP-2: 768); default: the LLM's width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
    /// Layers (`num_hidden_layers`; BLIP-2: 12).
    #[serde(default = "layers")]
    pub layers: usize,
    #[serde(default = "heads")]
    pub heads: usize,
    /// Feed-forward width (`intermediate_size`); default 4 × hidden.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate: Option<usize>,
    /// Cross-attention to the image in layers 0, f, 2f, … (`cross_attention_frequency`; BLIP-2: 2).
    #[serde(default = "frequency")]
    pub cross_attention_frequency: usize,
    #[serde(default = "gelu")]
    pub act: Act,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// InstructBLIP: the instruction's tokens join the queries (the Q-Former's own vocabulary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instruction: Option<InstructionSpec>,
}

/// The Q-Former's text side (InstructBLIP's `qformer_config`: BERT's vocabulary and positions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstructionSpec {
    pub vocab_size: usize,
    #[serde(default = "max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub pad_token_id: i64,
}
fn max_positions() -> usize {
    512
}
fn queries() -> usize {
    32
}
fn layers() -> usize {
    2
}
fn heads() -> usize {
    4
}
fn frequency() -> usize {
    2
}
fn gelu() -> Act {
    Act::Gelu
}
fn eps() -> f64 {
    1e-12
}

#[derive(Module, Debug)]
pub struct QMultiHeadAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    #[module(skip)]
    pub heads: usize,
}

/// dense → residual → LayerNorm (BERT's SelfOutput / Output).
#[derive(Module, Debug)]
pub struct QOutput {
    pub dense: Linear,
    pub LayerNorm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct QAttention {
    pub attention: QMultiHeadAttention,
    pub output: QOutput,
}

#[derive(Module, Debug)]
pub struct QIntermediate {
    pub dense: Linear,
    #[module(skip)]
    pub act: Act,
}

#[derive(Module, Debug)]
pub struct QFormerLayer {
    pub attention: QAttention,
    pub crossattention: Option<QAttention>,
    pub intermediate_query: QIntermediate,
    pub output_query: QOutput,
    /// The text tokens' feed-forward (instruction-aware only).
    pub intermediate: Option<QIntermediate>,
    pub output: Option<QOutput>,
}

#[derive(Module, Debug)]
pub struct QEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub layernorm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct QFormerEncoder {
    pub layer: Vec<QFormerLayer>,
}

#[derive(Module, Debug)]
pub struct QFormerModel {
    /// BLIP-2: the queries' layernorm.
    pub layernorm: Option<LayerNorm>,
    /// InstructBLIP: text embeddings, and the layernorm over [queries; text].
    pub embeddings: Option<QEmbeddings>,
    pub encoder: QFormerEncoder,
    #[module(skip)]
    pub pad_token_id: i64,
}

#[derive(Module, Debug)]
pub struct QFormer {
    /// [1, queries, hidden]
    pub query_tokens: Param<Tensor<3>>,
    pub qformer: QFormerModel,
    pub language_projection: Linear,
}

impl QFormerSpec {
    pub fn hidden(&self, llm: &LlmSpec) -> usize {
        self.hidden.unwrap_or(llm.hidden_size)
    }

    pub fn out_tokens(&self, _f: &Features) -> Result<usize, String> {
        if self.queries == 0 {
            return Err(
                "connector qformer: queries must be at least 1 (they are the image tokens)".into(),
            );
        }
        if self.layers == 0 || self.cross_attention_frequency == 0 {
            return Err(
                "connector qformer: layers and cross_attention_frequency must be at least 1".into(),
            );
        }
        if self.heads == 0 || self.hidden.is_some_and(|h| h % self.heads != 0) {
            return Err(format!(
                "connector qformer: hidden = {:?} is not a multiple of heads = {}",
                self.hidden, self.heads
            ));
        }
        Ok(self.queries)
    }

    pub fn init(&self, f: &Features, llm: &LlmSpec, device: &Device) -> QFormer {
        let h = self.hidden(llm);
        let inter = self.intermediate.unwrap_or(4 * h);
        let lin = |i: usize, o: usize| LinearConfig::new(i, o).init(device);
        let ln = || {
            LayerNormConfig::new(h)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let attn = |kv_in: usize| QAttention {
            attention: QMultiHeadAttention {
                query: lin(h, h),
                key: lin(kv_in, h),
                value: lin(kv_in, h),
                heads: self.heads,
            },
            output: QOutput {
                dense: lin(h, h),
                LayerNorm: ln(),
            },
        };
        QFormer {
            // transformers starts the queries at zero (a checkpoint overwrites them); identical queries would stay
            // identical under training, so a fresh connector draws them as BLIP-2's pre-training did (N(0, 0.02)).
            query_tokens: Param::from_tensor(Tensor::random(
                [1, self.queries, h],
                Distribution::Normal(0.0, 0.02),
                device,
            )),
            qformer: QFormerModel {
                layernorm: self.instruction.is_none().then(ln),
                embeddings: self.instruction.as_ref().map(|t| QEmbeddings {
                    word_embeddings: EmbeddingConfig::new(t.vocab_size, h).init(device),
                    position_embeddings: EmbeddingConfig::new(t.max_position_embeddings, h)
                        .init(device),
                    layernorm: ln(),
                }),
                pad_token_id: self.instruction.as_ref().map_or(0, |t| t.pad_token_id),
                encoder: QFormerEncoder {
                    layer: (0..self.layers)
                        .map(|i| QFormerLayer {
                            attention: attn(h),
                            crossattention: (i % self.cross_attention_frequency == 0)
                                .then(|| attn(f.width)),
                            intermediate_query: QIntermediate {
                                dense: lin(h, inter),
                                act: self.act,
                            },
                            output_query: QOutput {
                                dense: lin(inter, h),
                                LayerNorm: ln(),
                            },
                            intermediate: self.instruction.as_ref().map(|_| QIntermediate {
                                dense: lin(h, inter),
                                act: self.act,
                            }),
                            output: self.instruction.as_ref().map(|_| QOutput {
                                dense: lin(inter, h),
                                LayerNorm: ln(),
                            }),
                        })
                        .collect(),
                },
            },
            language_projection: lin(h, llm.hidden_size),
        }
    }
}

impl QOutput {
    fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        self.LayerNorm.forward(self.dense.forward(x) + residual)
    }
}

impl QAttention {
    /// x: [n, q, h]; kv: [n, t, d_kv] (x itself for self-attention) -> [n, q, h]. `mask` [n, 1, q, t] hides
    /// padding keys (the instruction's); image features are all valid.
    fn forward(&self, x: Tensor<3>, kv: Tensor<3>, mask: Option<&Tensor<4, Bool>>) -> Tensor<3> {
        let a = &self.attention;
        let [n, q, h] = x.dims();
        let t = kv.dims()[1];
        let hd = h / a.heads;
        let split = |y: Tensor<3>, len: usize| y.reshape([n, len, a.heads, hd]).swap_dims(1, 2);
        let o = attend(
            split(a.query.forward(x.clone()), q),
            split(a.key.forward(kv.clone()), t),
            split(a.value.forward(kv), t),
            mask,
        ); // [n, heads, q, hd]
        self.output.forward(o.swap_dims(1, 2).reshape([n, q, h]), x)
    }
}

impl QFormerLayer {
    fn ffn(inter: &QIntermediate, out: &QOutput, a: Tensor<3>) -> Tensor<3> {
        let mid = inter.act.forward(inter.dense.forward(a.clone()));
        out.forward(mid, a)
    }
}

impl QFormer {
    /// x: [n, tokens, width] (image features) -> [n, queries, d_llm]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with(x, None)
    }

    /// As `forward`, with one instruction per image (Q-Former token ids, unpadded) for the instruction-aware
    /// variant; ignored by BLIP-2's.
    pub fn forward_with(&self, x: Tensor<3>, instructions: Option<&[Vec<i64>]>) -> Tensor<3> {
        let n = x.dims()[0];
        let device = x.device();
        let [_, q, h] = self.query_tokens.dims();
        let queries = self.query_tokens.val().expand([n, q, h]);
        let (mut s, mask) = match (&self.qformer.embeddings, instructions) {
            (Some(emb), Some(ins)) if ins.iter().any(|r| !r.is_empty()) => {
                let t = ins.iter().map(Vec::len).max().unwrap_or(0);
                let pad = self.qformer.pad_token_id;
                let ids: Vec<i64> = ins
                    .iter()
                    .flat_map(|r| {
                        r.iter()
                            .copied()
                            .chain(std::iter::repeat_n(pad, t - r.len()))
                    })
                    .collect();
                let pos: Vec<i64> = (0..n).flat_map(|_| 0..t as i64).collect();
                // tables may be stored in bf16 (`frozen_dtype`); activations are f32
                let text = precision::to(
                    emb.word_embeddings
                        .forward(int_tensor(ids, [n, t], &device)),
                    DType::F32,
                ) + precision::to(
                    emb.position_embeddings
                        .forward(int_tensor(pos, [n, t], &device)),
                    DType::F32,
                );
                let valid: Vec<Vec<bool>> = ins
                    .iter()
                    .map(|r| {
                        let mut v = vec![true; q + r.len()];
                        v.resize(q + t, false);
                        v
                    })
                    .collect();
                let s = emb.layernorm.forward(Tensor::cat(vec![queries, text], 1));
                (s, Some(build_mask(&valid, q + t, false, None, &device)))
            }
            (Some(emb), _) => (emb.layernorm.forward(queries), None),
            (None, _) => (
                match &self.qformer.layernorm {
                    Some(ln) => ln.forward(queries),
                    None => queries,
                },
                None,
            ),
        };
        for layer in &self.qformer.encoder.layer {
            let a = layer.attention.forward(s.clone(), s, mask.as_ref());
            let total = a.dims()[1];
            let mut aq = a.clone().slice([0..n, 0..q, 0..h]);
            if let Some(cross) = &layer.crossattention {
                aq = cross.forward(aq, x.clone(), None);
            }
            let out_q = QFormerLayer::ffn(&layer.intermediate_query, &layer.output_query, aq);
            s = match (&layer.intermediate, &layer.output) {
                (Some(i), Some(o)) if total > q => {
                    let at = a.slice([0..n, q..total, 0..h]);
                    Tensor::cat(vec![out_q, QFormerLayer::ffn(i, o, at)], 1)
                }
                _ => out_q,
            };
        }
        self.language_projection
            .forward(s.slice([0..n, 0..q, 0..h]))
    }
}
