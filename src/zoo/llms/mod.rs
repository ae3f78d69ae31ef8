//! Causal LLMs of the zoo. One enum for the module ([`Llm`]), a variant per decoder file: LLaMA (LLaMA-2/3, Vicuna,
//! TinyLlama, Mistral) and Qwen2 share one decoder ([`decoder::Decoder`]) — they differ only in q/k/v bias, tied
//! embeddings and rope settings, which the spec carries ([`LlmFamily`] names them, in recipes too). A decoder with
//! another forward (M-RoPE, sliding windows, MoE) is a new file and a new variant here.
pub mod config;
pub mod decoder;

use burn::module::Module;
use burn::tensor::{Int, Tensor};

pub use config::{LlmFamily, LlmSpec};
pub use decoder::{Decoder, KvCache};

/// The LLM module (transparent in module paths, see `zoo::path`).
#[derive(Module, Debug)]
pub enum Llm {
    Decoder(Decoder),
}

impl Llm {
    /// The decoder stack (layers, final norm, head): what per-block recomputation walks through.
    pub fn decoder(&self) -> &Decoder {
        match self {
            Llm::Decoder(m) => m,
        }
    }

    /// ids: [b, t] -> [b, t, d]
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        match self {
            Llm::Decoder(m) => m.embed(ids),
        }
    }

    /// Blocks and final norm over input embeddings x: [b, t, d] -> hidden states [b, t, d] (see
    /// `Decoder::forward_embeds` for positions, key validity and the cache).
    pub fn forward_embeds(
        &self,
        x: Tensor<3>,
        positions: &[Vec<i64>],
        key_valid: &[Vec<bool>],
        segments: Option<&[Vec<u32>]>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        match self {
            Llm::Decoder(m) => m.forward_embeds(x, positions, key_valid, segments, cache),
        }
    }

    /// hidden: [b, t, d] -> logits [b, t, vocab]
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match self {
            Llm::Decoder(m) => m.logits(hidden),
        }
    }
}
