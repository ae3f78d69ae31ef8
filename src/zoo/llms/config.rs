//! LLM specs and their mapping from HuggingFace `config.json` (`LlamaConfig`, `MistralConfig`, `Qwen2Config`),
//! both the transformers 4.x keys (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`).
use crate::error::{Error, Result};
use crate::zoo::layers::act::Act;
use crate::zoo::layers::rope::{Rope, RopeScaling};
use serde::{Deserialize, Serialize};
use std::path::Path;

impl LlmFamily {
    pub fn hf_model_type(self) -> &'static str {
        match self {
            LlmFamily::Llama => "llama",
            LlmFamily::Mistral => "mistral",
            LlmFamily::Qwen2 => "qwen2",
        }
    }
    pub fn hf_architecture(self) -> &'static str {
        match self {
            LlmFamily::Llama => "LlamaForCausalLM",
            LlmFamily::Mistral => "MistralForCausalLM",
            LlmFamily::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// Everything needed to build a decoder; derived from config.json, never repeated in recipes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmSpec {
    pub family: LlmFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub act: Act,
    pub rope: Rope,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
}

#[derive(Deserialize)]
struct HfText {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<serde_json::Value>,
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    4096
}

fn ids(v: &Option<serde_json::Value>) -> Vec<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => vec![],
    }
}

pub fn parse_act(name: &str, path: &Path, key: &str) -> Result<Act> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|_| {
        Error::key(path, key, format!("unsupported activation `{name}` (mitune knows gelu, gelu_pytorch_tanh, gelu_new, quick_gelu, silu, relu)"))
    })
}

impl LlmSpec {
    /// From a text config object (`config.json` of a *ForCausalLM, or `text_config` of a LLaVA config).
    /// `tie_default` is the enclosing config's `tie_word_embeddings` (LLaVA puts it at the top level).
    pub fn from_hf(
        v: &serde_json::Value,
        path: &Path,
        prefix: &str,
        tie_default: Option<bool>,
    ) -> Result<Self> {
        let c: HfText = serde_json::from_value(v.clone()).map_err(|e| {
            Error::key(
                path,
                prefix.trim_end_matches('.'),
                format!("not a LLaMA/Qwen2 text config: {e}"),
            )
        })?;
        let mt = c.model_type.clone().unwrap_or_else(|| "llama".into());
        let family = match mt.as_str() {
            "llama" => LlmFamily::Llama,
            "mistral" => LlmFamily::Mistral,
            // Qwen2-VL's text model is Qwen2 with M-RoPE (`rope_parameters.mrope_section`)
            "qwen2" | "qwen2_vl_text" | "qwen2_5_vl_text" => LlmFamily::Qwen2,
            other => {
                return Err(Error::key(
                    path,
                    format!("{prefix}model_type"),
                    format!(
                        "unsupported LLM model_type `{other}` (mitune's zoo has llama, mistral, qwen2)"
                    ),
                ));
            }
        };
        if c.use_sliding_window == Some(true)
            && c.sliding_window.as_ref().is_some_and(|s| !s.is_null())
        {
            return Err(Error::key(
                path,
                format!("{prefix}use_sliding_window"),
                "sliding-window attention is not supported yet",
            ));
        }
        let act = parse_act(&c.hidden_act, path, &format!("{prefix}hidden_act"))?;
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        // rope: 5.x `rope_parameters` holds theta and type; 4.x has `rope_theta` + optional `rope_scaling`.
        let (theta, scaling_v) = match &c.rope_parameters {
            Some(p) => (
                p.get("rope_theta")
                    .and_then(|x| x.as_f64())
                    .or(c.rope_theta)
                    .unwrap_or(10000.0),
                Some(p.clone()),
            ),
            None => (c.rope_theta.unwrap_or(10000.0), c.rope_scaling.clone()),
        };
        let mut mrope_section = None;
        let scaling = match scaling_v {
            None | Some(serde_json::Value::Null) => RopeScaling::Default {},
            Some(mut s) => {
                if let Some(o) = s.as_object_mut() {
                    o.remove("rope_theta");
                    if let Some(t) = o.remove("type") {
                        o.entry("rope_type").or_insert(t);
                    }
                    // keys other types carry that don't change the frequencies
                    o.remove("partial_rotary_factor");
                    if let Some(m) = o.remove("mrope_section") {
                        mrope_section =
                            Some(serde_json::from_value::<Vec<usize>>(m).map_err(|e| {
                                Error::key(
                                    path,
                                    format!("{prefix}rope_parameters.mrope_section"),
                                    e.to_string(),
                                )
                            })?);
                    }
                    // Qwen2-VL 4.x configs name M-RoPE's (default) frequencies `mrope`
                    if o.get("rope_type").and_then(|t| t.as_str()) == Some("mrope") {
                        o.insert("rope_type".into(), "default".into());
                    }
                }
                serde_json::from_value(s.clone()).map_err(|e| {
                    Error::key(path, format!("{prefix}rope_scaling"), format!("unsupported rope scaling {s} ({e}); mitune knows default, linear, llama3"))
                })?
            }
        };
        let family_bias = family == LlmFamily::Qwen2;
        Ok(LlmSpec {
            family,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            act,
            rope: Rope {
                theta,
                head_dim,
                scaling,
                mrope_section,
            },
            qkv_bias: c.attention_bias.unwrap_or(family_bias),
            o_bias: c.attention_bias.unwrap_or(false) && !family_bias,
            mlp_bias: c.mlp_bias.unwrap_or(false),
            tie_word_embeddings: c
                .tie_word_embeddings
                .or(tie_default)
                .unwrap_or(family == LlmFamily::Qwen2),
            max_position_embeddings: c.max_position_embeddings,
            bos_token_id: ids(&c.bos_token_id).first().copied(),
            eos_token_ids: ids(&c.eos_token_id),
            pad_token_id: ids(&c.pad_token_id).first().copied(),
        })
    }

    /// The text config transformers writes (5.x keys; 4.x reads `rope_theta`/`rope_scaling` from it too).
    pub fn to_hf(&self) -> serde_json::Value {
        let mut rope = serde_json::to_value(&self.rope.scaling).unwrap();
        rope["rope_theta"] = self.rope.theta.into();
        if let Some(m) = &self.rope.mrope_section {
            rope["mrope_section"] = serde_json::json!(m);
        }
        let mut v = serde_json::json!({
            "model_type": self.family.hf_model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.act.hf_name(),
            "rope_theta": self.rope.theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "pad_token_id": self.pad_token_id,
        });
        if self.family != LlmFamily::Qwen2 {
            v["attention_bias"] = self.qkv_bias.into();
        }
        v
    }

    pub fn num_params(&self) -> usize {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.num_kv_heads * self.head_dim;
        let q = self.num_heads * self.head_dim;
        let attn = d * q + 2 * d * kv + q * d + if self.qkv_bias { q + 2 * kv } else { 0 };
        let layer = attn + 3 * d * f + 2 * d;
        v * d * if self.tie_word_embeddings { 1 } else { 2 } + self.num_layers * layer + d
    }
}

/// An LLM family as recipes name it (`[model.llm] kind = "llama"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmFamily {
    Llama,
    Mistral,
    Qwen2,
}
