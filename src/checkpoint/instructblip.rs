//! The `InstructBlipForConditionalGeneration` layout (Dai et al. 2023; transformers `modeling_instructblip.py`) on
//! mitune's encoder → connector → LLM model: the BLIP vision tower is the encoder (`vision_model.*`, features after
//! `post_layernorm`, every token), the instruction-aware Q-Former with its `query_tokens` and `language_projection`
//! is the connector (stored at the top level), the LLaMA is `language_model.*` as in LLaVA. The processor puts the
//! `num_query_tokens` image placeholders before the text (before BOS); the Q-Former reads the same text through its
//! own BERT tokenizer (`qformer_tokenizer/`).
use serde_json::{Value, json};
use std::path::Path;

use crate::error::{Error, Result};
use crate::zoo::connectors::ConnectorSpec;
use crate::zoo::connectors::qformer::{InstructionSpec, QFormerSpec};
use crate::zoo::encoders::{FeatureSelect, VisionSpec};
use crate::zoo::llms::LlmSpec;
use crate::zoo::llms::config::parse_act;
use crate::zoo::mllm::LlavaSpec;

/// The spec an `instructblip` config.json describes.
pub fn spec(v: &Value, path: &Path) -> Result<LlavaSpec> {
    let vision = VisionSpec::from_hf(
        v.get("vision_config").unwrap_or(&Value::Null),
        path,
        "vision_config.",
    )?;
    if !matches!(vision, VisionSpec::Blip(_)) {
        return Err(Error::key(
            path,
            "vision_config.model_type",
            "an InstructBLIP checkpoint needs its BLIP vision tower (instructblip_vision_model)",
        ));
    }
    let q = v.get("qformer_config").unwrap_or(&Value::Null);
    let get = |k: &str| -> Result<usize> {
        q.get(k)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| Error::key(path, format!("qformer_config.{k}"), "missing"))
    };
    let queries = v
        .get("num_query_tokens")
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::key(path, "num_query_tokens", "missing"))? as usize;
    let act = parse_act(
        q.get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu"),
        path,
        "qformer_config.hidden_act",
    )?;
    let connector = ConnectorSpec::Qformer(QFormerSpec {
        queries,
        hidden: Some(get("hidden_size")?),
        layers: get("num_hidden_layers")?,
        heads: get("num_attention_heads")?,
        intermediate: Some(get("intermediate_size")?),
        cross_attention_frequency: get("cross_attention_frequency")?,
        act,
        layer_norm_eps: q
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-12),
        instruction: Some(InstructionSpec {
            vocab_size: get("vocab_size")?,
            max_position_embeddings: get("max_position_embeddings")?,
            pad_token_id: q.get("pad_token_id").and_then(Value::as_i64).unwrap_or(0),
        }),
    });
    let llm = LlmSpec::from_hf(
        v.get("text_config").unwrap_or(&Value::Null),
        path,
        "text_config.",
        v.get("tie_word_embeddings").and_then(Value::as_bool),
    )?;
    let image_token_id = v
        .get("image_token_index")
        .or_else(|| v.get("image_token_id"))
        .and_then(Value::as_i64)
        .ok_or_else(|| Error::key(path, "image_token_index", "missing"))?;
    let spec = LlavaSpec {
        vision,
        select: FeatureSelect {
            layers: vec![-1],
            drop_cls: false,
            post_norm: true,
        },
        connector,
        projector_bias: true,
        llm,
        image_token_id,
        anyres: None,
        native: None,
    };
    spec.validate().map_err(|m| Error::file(path, m))?;
    Ok(spec)
}

/// Whether a model has InstructBLIP's shape (BLIP tower + instruction-aware Q-Former reading its last layer).
pub fn is_instructblip(spec: &LlavaSpec) -> bool {
    matches!(spec.vision, VisionSpec::Blip(_))
        && matches!(&spec.connector, ConnectorSpec::Qformer(q) if q.instruction.is_some())
        && spec.select.post_norm
}

/// The config.json transformers reads for it.
pub fn config(spec: &LlavaSpec) -> Value {
    let ConnectorSpec::Qformer(q) = &spec.connector else {
        return Value::Null;
    };
    let ins = q.instruction.clone().unwrap_or(InstructionSpec {
        vocab_size: 0,
        max_position_embeddings: 512,
        pad_token_id: 0,
    });
    let mut vision = spec.vision.to_hf();
    vision["model_type"] = "instructblip_vision_model".into();
    let hidden = q.hidden.unwrap_or(spec.llm.hidden_size);
    json!({
        "architectures": ["InstructBlipForConditionalGeneration"],
        "model_type": "instructblip",
        "vision_config": vision,
        "qformer_config": {
            "model_type": "instructblip_qformer",
            "vocab_size": ins.vocab_size,
            "hidden_size": hidden,
            "num_hidden_layers": q.layers,
            "num_attention_heads": q.heads,
            "intermediate_size": q.intermediate.unwrap_or(4 * hidden),
            "hidden_act": q.act.hf_name(),
            "max_position_embeddings": ins.max_position_embeddings,
            "layer_norm_eps": q.layer_norm_eps,
            "pad_token_id": ins.pad_token_id,
            "cross_attention_frequency": q.cross_attention_frequency,
            "encoder_hidden_size": spec.vision.hidden_size(),
        },
        "text_config": spec.llm.to_hf(),
        "num_query_tokens": q.queries,
        "image_token_index": spec.image_token_id,
        "use_decoder_only_language_model": true,
        "tie_word_embeddings": spec.llm.tie_word_embeddings,
        "dtype": "float32",
    })
}

/// Checkpoint names of a module path: `vision_tower.*` → `vision_model.*`, the connector's at the top level
/// (`query_tokens`, `qformer.*`, `language_projection.*`), the LLM as in LLaVA; transformers 5's `model.`-prefixed
/// names are accepted on read.
pub fn keys(path: &str) -> Vec<String> {
    let name = if let Some(rest) = path.strip_prefix("vision_tower.") {
        format!("vision_model.{rest}")
    } else if let Some(rest) = path.strip_prefix("multi_modal_projector.") {
        rest.to_string()
    } else if let Some(rest) = path.strip_prefix("language_model.") {
        if rest.starts_with("lm_head.") {
            return vec![format!("language_model.{rest}"), rest.to_string()];
        }
        return vec![
            format!("language_model.model.{rest}"),
            format!("model.language_model.{rest}"),
        ];
    } else {
        path.to_string()
    };
    vec![name.clone(), format!("model.{name}")]
}
