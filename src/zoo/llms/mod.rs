//! Causal LLMs of the zoo. LLaMA (LLaMA-2/3, Vicuna, TinyLlama, Mistral) and Qwen2 share one decoder
//! ([`decoder::Decoder`]): they differ only in q/k/v bias, tied embeddings and rope settings, which the spec carries.
pub mod config;
pub mod decoder;

pub use config::{LlmFamily, LlmSpec};
pub use decoder::{Decoder, KvCache};
