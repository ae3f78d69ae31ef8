//! The model zoo: encoders, connectors, LLMs, and their assembly into an MLLM.
pub mod anyres;
pub mod connectors;
pub mod encoders;
pub mod layers;
pub mod llms;
pub mod lora;
pub mod mllm;
pub mod native;
pub mod path;
pub mod presets;
pub mod sizing;
