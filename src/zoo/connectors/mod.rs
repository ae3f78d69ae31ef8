//! Connectors between the encoder's features and the LLM's embeddings (survey §2.3, projection-based).
//! `linear` is LLaVA-1's projection; `mlp` with depth N is LLaVA-1.5's `mlp2x_gelu` at N = 2. Widths come from the
//! encoder and the LLM, never from the recipe.
pub mod mlp;

pub use mlp::{ConnectorSpec, Projector};
