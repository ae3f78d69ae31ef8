//! Checkpoints in HuggingFace layout, read and written: LLaVA directories, standalone encoder/LLM directories a
//! model is composed from, tokenizer and processor files.
pub mod hf;
pub mod instructblip;
pub mod params;
pub mod peft;
pub mod qwen2vl;
pub mod safetensors_io;

pub use hf::{Composition, compose_llava, load_llava, save_llava};
