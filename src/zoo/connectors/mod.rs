//! Connectors between the encoder's features and the LLM's embeddings (survey §2.3, "modality interface").
//! Projection: `linear` (LLaVA-1), `mlp` (LLaVA-1.5's `mlp2x_gelu` at depth 2). Token compression: `pixel_shuffle`
//! (Idefics3 / SmolVLM space-to-depth), `pool` (2-D average or bilinear pooling to a grid, LLaVA-OneVision style).
//! Learnable queries: `resampler` (Flamingo's perceiver resampler as Idefics2 has it), `qformer` (BLIP-2).
//!
//! The connector owns its output token count: [`ConnectorSpec::out_tokens`] is a function of the encoder's
//! [`Features`] and its own spec; the text processor, placeholder expansion, config.json and `inspect` ask the
//! model (`LlavaSpec::image_tokens`), never recompute it. Widths come from the encoder and the LLM, never from
//! the recipe.
//!
//! **Adding a connector** touches two places:
//! 1. a new file here owning its spec struct (serde, `deny_unknown_fields`), its module with `init` and a
//!    `forward` with documented shapes, its output token count, and (where transformers has it) the names of
//!    its tensors — module fields carry transformers' names, so its key table is the identity;
//! 2. one variant in [`ConnectorSpec`] and one in [`Connector`] below (the compiler then lists the four `match`es
//!    of this file that need an arm).
//!
//! Nothing else changes: recipes select it by `kind`, sweeps by `"model.connector" = [{ kind = … }]`, checkpoints
//! save it under `multi_modal_projector.*` with its spec in config.json (`mitune_connector`), and parts, LoRA
//! and resume see it as the part `connector`.
pub mod merger;
pub mod mlp;
pub mod pixel_shuffle;
pub mod pool;
pub mod qformer;
pub mod resampler;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::zoo::layers::act::Act;
use crate::zoo::llms::LlmSpec;
pub use merger::{Merger, MergerSpec};
pub use mlp::Projector;
pub use pixel_shuffle::{PixelShuffle, PixelShuffleSpec};
pub use pool::{Pool, PoolMode, PoolSpec};
pub use qformer::{QFormer, QFormerSpec};
pub use resampler::{Resampler, ResamplerSpec};

/// What the encoder hands the connector per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Tokens per image.
    pub tokens: usize,
    /// Feature width (hidden size × selected layers).
    pub width: usize,
    /// (rows, cols) when the tokens are exactly the patch grid in row-major order (no CLS token).
    pub grid: Option<(usize, usize)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConnectorSpec {
    /// One linear layer (LLaVA-1).
    Linear {},
    /// linear → (act → linear) × (depth − 1) (LLaVA-1.5 at depth 2).
    Mlp {
        depth: usize,
        #[serde(default = "gelu")]
        act: Act,
    },
    /// Space-to-depth by `scale` then a linear (Idefics3): tokens / scale².
    PixelShuffle(PixelShuffleSpec),
    /// Pool the patch grid to `grid`×`grid` (or by `factor` per side), then an MLP.
    Pool(PoolSpec),
    /// Perceiver resampler (Idefics2): `latents` learnable queries cross-attend to the projected features.
    Resampler(ResamplerSpec),
    /// BLIP-2 Q-Former: `queries` learnable queries, BERT layers with cross-attention to the features.
    Qformer(QFormerSpec),
    /// Qwen2-VL's 2×2 patch merger (LayerNorm, concatenate each block, MLP).
    Merger(MergerSpec),
}
fn gelu() -> Act {
    Act::Gelu
}

/// The connector module: one variant per kind (transparent in module paths, see `zoo::path`).
#[derive(Module, Debug)]
pub enum Connector {
    /// `linear` and `mlp`.
    Mlp(Projector),
    PixelShuffle(PixelShuffle),
    Pool(Pool),
    Resampler(Resampler),
    Qformer(QFormer),
    Merger(Merger),
}

impl ConnectorSpec {
    /// The kind as recipes write it.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectorSpec::Linear {} => "linear",
            ConnectorSpec::Mlp { .. } => "mlp",
            ConnectorSpec::PixelShuffle(_) => "pixel_shuffle",
            ConnectorSpec::Pool(_) => "pool",
            ConnectorSpec::Resampler(_) => "resampler",
            ConnectorSpec::Qformer(_) => "qformer",
            ConnectorSpec::Merger(_) => "merger",
        }
    }

    /// Image tokens the LLM sees per image, or why this connector cannot take these features.
    pub fn out_tokens(&self, f: &Features) -> Result<usize, String> {
        match self {
            ConnectorSpec::Linear {} => Ok(f.tokens),
            ConnectorSpec::Mlp { depth, .. } => {
                if *depth == 0 {
                    return Err("connector mlp: depth must be at least 1".into());
                }
                Ok(f.tokens)
            }
            ConnectorSpec::PixelShuffle(s) => s.out_tokens(f),
            ConnectorSpec::Pool(s) => s.out_tokens(f),
            ConnectorSpec::Resampler(s) => s.out_tokens(f),
            ConnectorSpec::Qformer(s) => s.out_tokens(f),
            ConnectorSpec::Merger(s) => s.out_tokens(f),
        }
    }

    /// A fresh connector from the encoder's features to the LLM's width. `bias`: the projection's bias (LLaVA's
    /// `multimodal_projector_bias`; the other kinds follow their reference and ignore it).
    pub fn init(&self, f: &Features, llm: &LlmSpec, bias: bool, device: &Device) -> Connector {
        match self {
            ConnectorSpec::Linear {} => Connector::Mlp(mlp::init(
                1,
                Act::Gelu,
                f.width,
                llm.hidden_size,
                bias,
                device,
            )),
            ConnectorSpec::Mlp { depth, act } => Connector::Mlp(mlp::init(
                *depth,
                *act,
                f.width,
                llm.hidden_size,
                bias,
                device,
            )),
            ConnectorSpec::PixelShuffle(s) => Connector::PixelShuffle(s.init(f, llm, device)),
            ConnectorSpec::Pool(s) => Connector::Pool(s.init(f, llm, bias, device)),
            ConnectorSpec::Resampler(s) => Connector::Resampler(s.init(f, llm, device)),
            ConnectorSpec::Qformer(s) => Connector::Qformer(s.init(f, llm, device)),
            ConnectorSpec::Merger(s) => Connector::Merger(s.init(f, llm, device)),
        }
    }

    /// LLaVA's `projector_hidden_act` for config.json (the MLP's; the others write their own spec).
    pub fn act(&self) -> Act {
        match self {
            ConnectorSpec::Mlp { act, .. } => *act,
            ConnectorSpec::Pool(p) => p.act,
            _ => Act::Gelu,
        }
    }
}

impl Connector {
    /// The linear/MLP projector, when this connector is one.
    pub fn as_mlp(&self) -> Option<&Projector> {
        match self {
            Connector::Mlp(m) => Some(m),
            _ => None,
        }
    }

    /// As `forward`, with the instruction of each image (token ids of the connector's own vocabulary) for the
    /// connectors that read one (InstructBLIP's Q-Former); the others ignore it.
    pub fn forward_with(&self, x: Tensor<3>, instructions: Option<&[Vec<i64>]>) -> Tensor<3> {
        match self {
            Connector::Qformer(m) => m.forward_with(x, instructions),
            other => other.forward(x),
        }
    }

    /// x: [n, tokens_in, width] -> [n, tokens_out, d_llm]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Connector::Mlp(m) => m.forward(x),
            Connector::PixelShuffle(m) => m.forward(x),
            Connector::Pool(m) => m.forward(x),
            Connector::Resampler(m) => m.forward(x),
            Connector::Qformer(m) => m.forward(x),
            Connector::Merger(m) => m.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_kinds_parse_and_reject_unknown_keys() {
        let ok: ConnectorSpec = toml::from_str("kind = \"pixel_shuffle\"\nscale = 2").unwrap();
        assert_eq!(
            ok,
            ConnectorSpec::PixelShuffle(PixelShuffleSpec { scale: 2 })
        );
        let err =
            toml::from_str::<ConnectorSpec>("kind = \"pool\"\ngrid = 2\nsize = 3").unwrap_err();
        assert!(err.to_string().contains("size"), "{err}");
        let err =
            toml::from_str::<ConnectorSpec>("kind = \"mlp\"\ndepth = 2\nbogus = 1").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn token_counts_are_the_connectors() {
        let f = Features {
            tokens: 16,
            width: 8,
            grid: Some((4, 4)),
        };
        let mlp = ConnectorSpec::Mlp {
            depth: 2,
            act: Act::Gelu,
        };
        assert_eq!(mlp.out_tokens(&f), Ok(16));
        let ps = ConnectorSpec::PixelShuffle(PixelShuffleSpec { scale: 2 });
        assert_eq!(ps.out_tokens(&f), Ok(4));
        let pool: ConnectorSpec = toml::from_str("kind = \"pool\"\ngrid = 2").unwrap();
        assert_eq!(pool.out_tokens(&f), Ok(4));
        let big: ConnectorSpec = toml::from_str("kind = \"pool\"\ngrid = 5").unwrap();
        assert!(big.out_tokens(&f).unwrap_err().contains("larger than"));
        let by2: ConnectorSpec = toml::from_str("kind = \"pool\"\nfactor = 2").unwrap();
        assert_eq!(by2.out_tokens(&f), Ok(4));
        let odd3 = Features {
            tokens: 9,
            width: 8,
            grid: Some((3, 3)),
        };
        assert_eq!(by2.out_tokens(&odd3), Ok(4)); // ⌈3/2⌉² as OneVision
        let both: ConnectorSpec = toml::from_str("kind = \"pool\"\nfactor = 2\ngrid = 1").unwrap();
        assert!(both.out_tokens(&f).unwrap_err().contains("exactly one"));
        let rs: ConnectorSpec = toml::from_str("kind = \"resampler\"\nlatents = 3").unwrap();
        assert_eq!(rs.out_tokens(&f), Ok(3));
        let none: ConnectorSpec = toml::from_str("kind = \"resampler\"\nlatents = 0").unwrap();
        assert!(none.out_tokens(&f).is_err());
        let q: ConnectorSpec = toml::from_str("kind = \"qformer\"\nqueries = 32").unwrap();
        assert_eq!(q.out_tokens(&f), Ok(32));
        let q0: ConnectorSpec = toml::from_str("kind = \"qformer\"\nqueries = 0").unwrap();
        assert!(
            q0.out_tokens(&f)
                .unwrap_err()
                .contains("queries must be at least 1")
        );
        // a CLS token (no grid) cannot be pixel-shuffled
        let cls = Features {
            tokens: 17,
            width: 8,
            grid: None,
        };
        assert!(ps.out_tokens(&cls).unwrap_err().contains("patch grid"));
        let odd = Features {
            tokens: 9,
            width: 8,
            grid: Some((3, 3)),
        };
        assert!(ps.out_tokens(&odd).unwrap_err().contains("divisible"));
    }
}
