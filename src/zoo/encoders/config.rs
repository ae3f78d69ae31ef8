//! CLIP/SigLIP vision specs from HuggingFace `CLIPVisionConfig` / `SiglipVisionConfig`, and LLaVA's feature selection
//! (`vision_feature_layer`, `vision_feature_select_strategy`).
use crate::error::{Error, Result};
use crate::zoo::layers::act::Act;
use crate::zoo::llms::config::parse_act;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VitFamily {
    /// CLIP ViT: class token, `pre_layrnorm`, patch conv without bias, quick_gelu.
    Clip,
    /// SigLIP ViT: no class token, no pre-norm, patch conv with bias, gelu (tanh).
    Siglip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitSpec {
    pub family: VitFamily,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_channels: usize,
    pub patch_size: usize,
    /// Resolution the position embeddings were trained at.
    pub image_size: usize,
    /// Resolution images are fed at; position embeddings are interpolated when it differs (direct scaling).
    pub input_size: usize,
    pub layer_norm_eps: f64,
    pub act: Act,
}

/// Which hidden states become image features: transformers' `vision_feature_layer` (index into hidden_states,
/// where 0 is the embedding output, so -2 is the second-to-last block; several are concatenated on the feature
/// axis) and `vision_feature_select_strategy` (`default` drops the CLS token, `full` keeps every token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSelect {
    pub layers: Vec<i64>,
    pub drop_cls: bool,
    /// The last layer's hidden state after the tower's final norm (BLIP-2 / InstructBLIP read `last_hidden_state`).
    #[serde(default)]
    pub post_norm: bool,
}

#[derive(Deserialize)]
struct HfVision {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "three")]
    num_channels: usize,
    patch_size: usize,
    image_size: usize,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
}
fn three() -> usize {
    3
}

impl VitSpec {
    pub fn from_hf(v: &serde_json::Value, path: &Path, prefix: &str) -> Result<Self> {
        let c: HfVision = serde_json::from_value(v.clone()).map_err(|e| {
            Error::key(
                path,
                prefix.trim_end_matches('.'),
                format!("not a CLIP/SigLIP vision config: {e}"),
            )
        })?;
        let mt = c
            .model_type
            .clone()
            .unwrap_or_else(|| "clip_vision_model".into());
        let family = match mt.as_str() {
            "clip_vision_model" | "clip" => VitFamily::Clip,
            "siglip_vision_model" | "siglip" => VitFamily::Siglip,
            other => {
                return Err(Error::key(
                    path,
                    format!("{prefix}model_type"),
                    format!(
                        "unsupported vision model_type `{other}` (mitune's zoo has clip_vision_model, siglip_vision_model)"
                    ),
                ));
            }
        };
        let default_act = if family == VitFamily::Clip {
            "quick_gelu"
        } else {
            "gelu_pytorch_tanh"
        };
        let act_name = c.hidden_act.clone().unwrap_or_else(|| default_act.into());
        let act = parse_act(&act_name, path, &format!("{prefix}hidden_act"))?;
        let eps = c.layer_norm_eps.unwrap_or(if family == VitFamily::Clip {
            1e-5
        } else {
            1e-6
        });
        if c.image_size % c.patch_size != 0 {
            return Err(Error::key(
                path,
                format!("{prefix}image_size"),
                "image_size must be a multiple of patch_size",
            ));
        }
        Ok(VitSpec {
            family,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_channels: c.num_channels,
            patch_size: c.patch_size,
            image_size: c.image_size,
            input_size: c.image_size,
            layer_norm_eps: eps,
            act,
        })
    }

    pub fn to_hf(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": match self.family { VitFamily::Clip => "clip_vision_model", VitFamily::Siglip => "siglip_vision_model" },
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_channels": self.num_channels,
            "patch_size": self.patch_size,
            // The position table is stored at the trained grid: transformers interpolates it at run time
            // (`interpolate_pos_encoding`) for other input sizes, so the trained size is what config.json holds.
            "image_size": self.image_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.act.hf_name(),
        })
    }

    pub fn has_cls(&self) -> bool {
        self.family == VitFamily::Clip
    }

    /// Patches per side at the input resolution.
    pub fn grid(&self) -> usize {
        self.input_size / self.patch_size
    }

    /// Tokens the tower outputs per image (patches, plus CLS for CLIP).
    pub fn num_tokens(&self) -> usize {
        self.grid() * self.grid() + usize::from(self.has_cls())
    }
}

impl FeatureSelect {
    /// From LLaVA's config values: `vision_feature_layer` (int or list) and the strategy string.
    pub fn from_hf(layer: &serde_json::Value, strategy: &str, path: &Path) -> Result<Self> {
        let layers = match layer {
            serde_json::Value::Number(n) => vec![n.as_i64().unwrap_or(-2)],
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_i64()).collect(),
            serde_json::Value::Null => vec![-2],
            other => {
                return Err(Error::key(
                    path,
                    "vision_feature_layer",
                    format!("expected an int or a list, got {other}"),
                ));
            }
        };
        let drop_cls = match strategy {
            "default" => true,
            "full" => false,
            other => {
                return Err(Error::key(
                    path,
                    "vision_feature_select_strategy",
                    format!("unknown strategy `{other}` (default or full)"),
                ));
            }
        };
        Ok(FeatureSelect {
            layers,
            drop_cls,
            post_norm: false,
        })
    }

    pub fn hf_layer(&self) -> serde_json::Value {
        match self.layers.as_slice() {
            [one] => (*one).into(),
            many => many.into(),
        }
    }

    /// Indices into hidden_states (length num_layers + 1), checked.
    pub fn indices(&self, num_layers: usize) -> std::result::Result<Vec<usize>, String> {
        let n = num_layers as i64 + 1;
        self.layers
            .iter()
            .map(|&l| {
                let i = if l < 0 { n + l } else { l };
                if (0..n).contains(&i) {
                    Ok(i as usize)
                } else {
                    Err(format!(
                        "vision_feature_layer {l} is out of range for {num_layers} layers"
                    ))
                }
            })
            .collect()
    }

    /// Tokens the selection drops from the front: the CLS token and registers under `patch`/`default`
    /// (transformers' `default` drops one token even from SigLIP, which has no CLS: kept for parity).
    pub fn dropped(&self, vision: &super::VisionSpec) -> usize {
        if matches!(vision, super::VisionSpec::Fused(_)) {
            return 0; // each tower dropped its own
        }
        if self.drop_cls {
            vision.prefix_tokens().max(1)
        } else {
            0
        }
    }

    /// What a tower hands the connector per image: tokens, width, and the patch grid when the tokens are exactly
    /// the patches (CLS and registers dropped, or a tower without them that keeps them all).
    pub fn features(&self, vision: &super::VisionSpec) -> crate::zoo::connectors::Features {
        let (tokens, width) = self.tokens_and_width(vision);
        let g = vision.grid();
        crate::zoo::connectors::Features {
            tokens,
            width,
            grid: (tokens == g * g).then_some((g, g)),
        }
    }

    /// Image tokens per image and feature width for a tower.
    pub fn tokens_and_width(&self, vision: &super::VisionSpec) -> (usize, usize) {
        let tokens = vision.num_tokens() - self.dropped(vision);
        (tokens, vision.hidden_size() * self.layers.len())
    }
}
