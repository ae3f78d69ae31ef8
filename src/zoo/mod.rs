//! The model zoo: encoders, connectors, LLMs, and their assembly into an MLLM. The zoo owns every model name and
//! spec (families, parts, budgets, adapters, HF key tables) and imports nothing above it; the recipe composes them.
pub mod anyres;
pub mod connectors;
pub mod encoders;
pub mod keys;
pub mod layers;
pub mod llms;
pub mod lora;
pub mod mllm;
pub mod native;
pub mod parts;
pub mod path;
pub mod presets;
pub mod sizing;
