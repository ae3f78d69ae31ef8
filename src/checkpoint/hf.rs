//! HuggingFace directories <-> zoo models. `config.json` decides the architecture; weights come from
//! `model.safetensors` or its shards; a directory saved here loads in transformers'
//! `LlavaForConditionalGeneration.from_pretrained` without conversion.
use burn::tensor::Device;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

use super::params::{Collector, Loader};
use super::safetensors_io::{WeightStore, write_file};
use crate::error::{Error, Result, read_json};
use crate::zoo::anyres::AnyRes;
use crate::zoo::connectors::ConnectorSpec;
use crate::zoo::encoders::{FeatureSelect, VisionSpec};
use crate::zoo::keys;
use crate::zoo::llms::LlmSpec;
use crate::zoo::llms::config::parse_act;
use crate::zoo::mllm::{Llava, LlavaSpec};

pub fn config_of(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "no such checkpoint directory"));
    }
    let path = dir.join("config.json");
    let v: serde_json::Value = read_json(&path)?;
    Ok((path, v))
}

/// A directory's image processor json: `preprocessor_config.json`, or the `image_processor` entry of a 5.x
/// `processor_config.json`.
pub fn read_processor(dir: &Path) -> Result<serde_json::Value> {
    let pre = dir.join("preprocessor_config.json");
    if pre.exists() {
        return read_json(&pre);
    }
    let p = dir.join("processor_config.json");
    let v: serde_json::Value = read_json(&p)?;
    v.get("image_processor")
        .cloned()
        .ok_or_else(|| Error::key(&p, "image_processor", "missing"))
}

/// A directory's video processor json: `video_preprocessor_config.json`, or the `video_processor` entry of a 5.x
/// `processor_config.json`; `Null` when it has neither.
pub fn read_video_processor(dir: &Path) -> Result<serde_json::Value> {
    let own = dir.join("video_preprocessor_config.json");
    if own.exists() {
        return read_json(&own);
    }
    let p = dir.join("processor_config.json");
    if p.exists() {
        let v: serde_json::Value = read_json(&p)?;
        if let Some(vp) = v.get("video_processor") {
            return Ok(vp.clone());
        }
    }
    Ok(serde_json::Value::Null)
}

fn model_type(v: &serde_json::Value) -> &str {
    v.get("model_type").and_then(|m| m.as_str()).unwrap_or("")
}

/// The spec a LLaVA (or InstructBLIP) config.json describes.
pub fn llava_spec(dir: &Path) -> Result<LlavaSpec> {
    let (path, v) = config_of(dir)?;
    if model_type(&v) == "instructblip" {
        return super::instructblip::spec(&v, &path);
    }
    if matches!(model_type(&v), "qwen2_vl" | "qwen2_5_vl") {
        let processor = read_processor(dir).unwrap_or(serde_json::Value::Null);
        let video = read_video_processor(dir)?;
        return super::qwen2vl::spec(&v, &path, &processor, &video);
    }
    let next = matches!(model_type(&v), "llava_next" | "llava_onevision");
    let onevision = model_type(&v) == "llava_onevision";
    if model_type(&v) != "llava" && !next {
        return Err(Error::key(
            &path,
            "model_type",
            format!(
                "`{}` is not a LLaVA checkpoint (expected \"llava\", \"llava_next\", \"llava_onevision\", \"instructblip\", \"qwen2_vl\" or \"qwen2_5_vl\"); compose standalone encoder/LLM directories with --encoder/--llm",
                model_type(&v)
            ),
        ));
    }
    let vision = VisionSpec::from_hf(
        v.get("vision_config").unwrap_or(&serde_json::Value::Null),
        &path,
        "vision_config.",
    )?;
    let llm = LlmSpec::from_hf(
        v.get("text_config").unwrap_or(&serde_json::Value::Null),
        &path,
        "text_config.",
        v.get("tie_word_embeddings").and_then(|t| t.as_bool()),
    )?;
    let act = parse_act(
        v.get("projector_hidden_act")
            .and_then(|a| a.as_str())
            .unwrap_or("gelu"),
        &path,
        "projector_hidden_act",
    )?;
    let select = FeatureSelect::from_hf(
        v.get("vision_feature_layer")
            .unwrap_or(&serde_json::Value::Null),
        v.get("vision_feature_select_strategy")
            .and_then(|s| s.as_str())
            .unwrap_or("default"),
        &path,
    )?;
    let image_token_id = v
        .get("image_token_index")
        .or_else(|| v.get("image_token_id"))
        .and_then(|x| x.as_i64())
        .ok_or_else(|| Error::key(&path, "image_token_index", "missing"))?;
    // transformers' projector is always 2 layers; other connectors carry LLaVA's own `mm_projector_type` name,
    // and the kinds LLaVA has no name for carry their spec as `mitune_connector`
    let connector = match (
        v.get("mitune_connector"),
        v.get("mm_projector_type").and_then(|t| t.as_str()),
    ) {
        (Some(c), _) => serde_json::from_value::<ConnectorSpec>(c.clone())
            .map_err(|e| Error::key(&path, "mitune_connector", e.to_string()))?,
        (None, None) => ConnectorSpec::Mlp { depth: 2, act },
        (None, Some(t)) => projector_type(t).ok_or_else(|| {
            Error::key(
                &path,
                "mm_projector_type",
                format!("{t:?}: expected \"linear\" or \"mlp<N>x_<act>\" (e.g. mlp2x_gelu)"),
            )
        })?,
    };
    // LLaVA-NeXT: tiles of the encoder's own size, pinpoints as (height, width)
    let anyres = if next {
        let pins = v.get("image_grid_pinpoints").cloned().unwrap_or_else(|| {
            serde_json::json!([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
        });
        let pinpoints: Vec<[u32; 2]> = serde_json::from_value(pins).map_err(|e| {
            Error::key(
                &path,
                "image_grid_pinpoints",
                format!("expected a list of [height, width] pairs: {e}"),
            )
        })?;
        // LLaVA-OneVision: `vision_aspect_ratio = "anyres_max_N"`, and multi-image samples are not tiled
        let max_tiles = if onevision {
            let r = v
                .get("vision_aspect_ratio")
                .and_then(|x| x.as_str())
                .unwrap_or("anyres_max_9");
            Some(
                r.strip_prefix("anyres_max_")
                    .and_then(|n| n.parse::<u32>().ok())
                    .ok_or_else(|| {
                        Error::key(
                            &path,
                            "vision_aspect_ratio",
                            format!("{r:?}: expected \"anyres_max_N\""),
                        )
                    })?,
            )
        } else {
            None
        };
        Some(AnyRes {
            pinpoints,
            tile: vision.image_size() as u32,
            grid: (vision.image_size() / vision.patch_size().max(1)) as u32,
            max_tiles,
            single_tile_in_multi: onevision,
        })
    } else {
        None
    };
    let spec = LlavaSpec {
        vision,
        select,
        connector,
        projector_bias: v
            .get("multimodal_projector_bias")
            .and_then(|b| b.as_bool())
            .unwrap_or(true),
        llm,
        image_token_id,
        anyres,
        native: None,
    };
    spec.validate().map_err(|m| Error::file(&path, m))?;
    Ok(spec)
}

/// Loads a `LlavaForConditionalGeneration` directory. Every tensor must be present and used.
pub fn load_llava(dir: &Path, device: &Device) -> Result<Llava> {
    let spec = llava_spec(dir)?;
    let store = WeightStore::open_dir(dir)?;
    let model = spec.init(device);
    let keys: &dyn Fn(&str) -> Vec<String> = if super::instructblip::is_instructblip(&spec) {
        &super::instructblip::keys
    } else if super::qwen2vl::is_qwen2vl(&spec) {
        &keys::qwen2vl
    } else {
        &keys::llava
    };
    Loader::new(&store, keys, &[], device).load(model)
}

/// How to build a LLaVA model from standalone parts: an encoder directory (CLIPVisionModel / SiglipVisionModel /
/// CLIPModel), an LLM directory (LlamaForCausalLM / Qwen2ForCausalLM), and a connector that starts fresh.
pub struct Composition<'a> {
    pub encoder: &'a Path,
    pub llm: &'a Path,
    pub connector: ConnectorSpec,
    pub select: FeatureSelect,
    /// Input resolution; position embeddings are interpolated when it differs from the encoder's.
    pub image_size: Option<usize>,
    pub image_token_id: i64,
}

/// The vision spec of a standalone encoder directory (CLIPVisionModel / SiglipVisionModel / Dinov2Model, or a full
/// CLIPModel whose tower config sits under `vision_config`).
pub fn vision_spec_of(dir: &Path) -> Result<VisionSpec> {
    let (vpath, vcfg) = config_of(dir)?;
    let (vv, prefix) = match vcfg.get("vision_config") {
        Some(inner) if model_type(&vcfg) != "clip_vision_model" => {
            (inner.clone(), "vision_config.")
        }
        _ => (vcfg.clone(), ""),
    };
    VisionSpec::from_hf(&vv, &vpath, prefix)
}

/// Partial load, explicit: encoder and LLM weights from their directories, connector freshly initialized.
pub fn compose_llava(c: &Composition, device: &Device) -> Result<Llava> {
    let mut vision = vision_spec_of(c.encoder)?;
    if let Some(s) = c.image_size {
        if s % vision.patch_size() != 0 {
            return Err(Error::input(format!(
                "image size {s} is not a multiple of the encoder's patch size {}",
                vision.patch_size()
            )));
        }
        vision.set_input_size(s, false);
    }
    let (lpath, lcfg) = config_of(c.llm)?;
    let llm = LlmSpec::from_hf(&lcfg, &lpath, "", None)?;
    let spec = LlavaSpec {
        vision,
        select: c.select.clone(),
        connector: c.connector.clone(),
        projector_bias: true,
        llm,
        image_token_id: c.image_token_id,
        anyres: None,
        native: None,
    };
    spec.validate().map_err(Error::input)?;
    load_parts(spec.init(device), Some(c.encoder), Some(c.llm), device)
}

/// Fills the encoder and/or the LLM of an initialized model from standalone directories; the other parts stay
/// as initialized.
pub fn load_parts(
    model: Llava,
    encoder: Option<&Path>,
    llm: Option<&Path>,
    device: &Device,
) -> Result<Llava> {
    let mut model = model;
    if let Some(dir) = encoder {
        let store = WeightStore::open_dir(dir)?;
        // Fresh prefixes skip the other components, so each store only sees its own component's paths.
        let vk: &dyn Fn(&str) -> Vec<String> =
            &|p| keys::vision(p.strip_prefix("vision_tower.").unwrap_or(p));
        model = Loader::new(
            &store,
            vk,
            &["multi_modal_projector.", "language_model.", "image_newline"],
            device,
        )
        .load(model)?;
    }
    if let Some(dir) = llm {
        let store = WeightStore::open_dir(dir)?;
        let lk: &dyn Fn(&str) -> Vec<String> =
            &|p| keys::llm(p.strip_prefix("language_model.").unwrap_or(p));
        model = Loader::new(
            &store,
            lk,
            &["multi_modal_projector.", "vision_tower.", "image_newline"],
            device,
        )
        .load(model)?;
    }
    Ok(model)
}

/// Fills tower `i` of a fused encoder from a standalone encoder directory; everything else stays as it is.
pub fn load_tower(model: Llava, i: usize, dir: &Path, device: &Device) -> Result<Llava> {
    let store = WeightStore::open_dir(dir)?;
    let prefix = format!("vision_tower.towers.{i}.");
    let others: Vec<String> = match &model.spec.vision {
        VisionSpec::Fused(f) => (0..f.towers.len())
            .filter(|&j| j != i)
            .map(|j| format!("vision_tower.towers.{j}."))
            .collect(),
        _ => vec![],
    };
    let mut fresh: Vec<&str> = vec!["multi_modal_projector.", "language_model."];
    fresh.extend(others.iter().map(String::as_str));
    let vk = |p: &str| keys::vision(p.strip_prefix(prefix.as_str()).unwrap_or(p));
    let vk: &dyn Fn(&str) -> Vec<String> = &vk;
    Loader::new(&store, vk, &fresh, device).load(model)
}

/// Which component a standalone export holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Encoder,
    Llm,
}

/// Writes one component as a standalone transformers directory: `CLIPVisionModel`/`SiglipVisionModel`
/// (`vision_model.*`) or `LlamaForCausalLM`/`Qwen2ForCausalLM` (`model.*`, `lm_head.weight`).
pub fn save_part(model: &Llava, part: Part, out: &Path, dtype: Dtype) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    const SKIP: &str = "__skip__.";
    let (prefix, cfg) = match part {
        Part::Encoder if matches!(model.spec.vision, VisionSpec::Fused(_)) => {
            return Err(Error::input(
                "a fused encoder has no standalone transformers class: export the LLaVA directory (mitune layout)",
            ));
        }
        Part::Encoder => {
            let mut v = model.spec.vision.to_hf();
            v["architectures"] = serde_json::json!([model.spec.vision.hf_architecture()]);
            ("vision_tower.", v)
        }
        Part::Llm => {
            let mut v = model.spec.llm.to_hf();
            v["architectures"] = serde_json::json!([model.spec.llm.family.hf_architecture()]);
            ("language_model.", v)
        }
    };
    let keys = |p: &str| -> Vec<String> {
        match p.strip_prefix(prefix) {
            Some(rest) if part == Part::Encoder => keys::vision(rest),
            Some(rest) => keys::llm(rest),
            None => vec![format!("{SKIP}{p}")],
        }
    };
    let keys: &dyn Fn(&str) -> Vec<String> = &keys;
    let mut tensors = Collector::collect(model, keys, dtype);
    tensors.retain(|t| !t.name.starts_with(SKIP));
    write_file(&out.join("model.safetensors"), &tensors)?;
    write_json(&out.join("config.json"), &cfg)
}

/// Writes pretty JSON through a temporary file and a rename (a kill never leaves half a file).
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    crate::error::write_json_atomic(path, v)
}

/// LLaVA's `mm_projector_type` names: `linear`, `mlp<N>x_<act>`.
fn projector_type(t: &str) -> Option<ConnectorSpec> {
    if t == "linear" {
        return Some(ConnectorSpec::Linear {});
    }
    let (depth, act) = t.strip_prefix("mlp")?.split_once("x_")?;
    let depth: usize = depth.parse().ok().filter(|d| *d >= 1)?;
    let act = parse_act(act, Path::new(""), "").ok()?;
    Some(ConnectorSpec::Mlp { depth, act })
}

/// The `mm_projector_type` of a connector transformers' 2-layer projector cannot hold (None for that one).
pub fn nonstandard_projector(c: &ConnectorSpec) -> Option<String> {
    match c {
        ConnectorSpec::Mlp { depth: 2, .. } => None,
        ConnectorSpec::Linear {} => Some("linear".into()),
        ConnectorSpec::Mlp { depth, act } => Some(format!("mlp{depth}x_{}", act.hf_name())),
        other => Some(other.kind().into()),
    }
}

/// The config.json transformers reads for this model. A connector other than the 2-layer MLP is written with
/// LLaVA's `mm_projector_type` (`linear`, `mlp3x_gelu`) and `linear_{i}` weights, and the kinds LLaVA has no
/// name for (`pool`, `pixel_shuffle`, `resampler`) also with their spec as `mitune_connector`: mitune loads them
/// back; transformers' LlavaForConditionalGeneration cannot (its projector is fixed at 2 layers).
pub fn llava_config(spec: &LlavaSpec) -> Result<serde_json::Value> {
    let act = spec.connector.act();
    let vision = spec.vision.to_hf();
    let mut cfg = serde_json::json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": spec.llm.to_hf(),
        "image_token_index": spec.image_token_id,
        "image_seq_length": spec.image_tokens(),
        "projector_hidden_act": act.hf_name(),
        "multimodal_projector_bias": spec.projector_bias,
        "vision_feature_layer": spec.select.hf_layer(),
        "vision_feature_select_strategy": if spec.select.drop_cls { "default" } else { "full" },
        "tie_word_embeddings": spec.llm.tie_word_embeddings,
        "dtype": "float32",
    });
    if let Some(a) = &spec.anyres {
        // LLaVA-OneVision is AnyRes with its two rules; a tiling transformers has no class for is an error
        let onevision = match (a.max_tiles, a.single_tile_in_multi) {
            (None, false) => false,
            (Some(_), true) => true,
            _ => {
                return Err(Error::input(
                    "AnyRes with only one of LLaVA-OneVision's rules (max_tiles, single_tile_in_multi) has no \
                     transformers class: set both (LLaVA-OneVision) or neither (LLaVA-NeXT)",
                ));
            }
        };
        let (arch, mt) = if onevision {
            ("LlavaOnevisionForConditionalGeneration", "llava_onevision")
        } else {
            ("LlavaNextForConditionalGeneration", "llava_next")
        };
        cfg["architectures"] = serde_json::json!([arch]);
        cfg["model_type"] = mt.into();
        cfg["image_grid_pinpoints"] = serde_json::json!(a.pinpoints);
        if let Some(n) = a.max_tiles {
            cfg["vision_aspect_ratio"] = format!("anyres_max_{n}").into();
        }
    }
    if let Some(t) = nonstandard_projector(&spec.connector) {
        cfg["mm_projector_type"] = t.into();
    }
    if !matches!(
        spec.connector,
        ConnectorSpec::Linear {} | ConnectorSpec::Mlp { .. }
    ) {
        cfg["mitune_connector"] = serde_json::to_value(&spec.connector).unwrap_or_default();
    }
    Ok(cfg)
}

/// Writes `config.json` + `model.safetensors` (f32 or bf16/f16) into `out`, and copies the tokenizer/processor
/// files from `assets` (the directory the model came from) when given.
pub fn save_llava(model: &Llava, out: &Path, dtype: Dtype, assets: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let instructblip = super::instructblip::is_instructblip(&model.spec);
    let qwen = super::qwen2vl::is_qwen2vl(&model.spec);
    let mut cfg = if instructblip {
        super::instructblip::config(&model.spec)
    } else if qwen {
        super::qwen2vl::config(&model.spec)
    } else {
        llava_config(&model.spec)?
    };
    cfg["dtype"] = match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
    .into();
    let keys: &dyn Fn(&str) -> Vec<String> = if instructblip {
        &super::instructblip::keys
    } else if qwen {
        &keys::qwen2vl
    } else {
        &keys::llava
    };
    let tensors = Collector::collect(model, keys, dtype);
    write_file(&out.join("model.safetensors"), &tensors)?;
    let cfg_path = out.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).map_err(|source| {
        Error::Io {
            path: cfg_path,
            source,
        }
    })?;
    if let Some(src) = assets {
        crate::data::tokenizer::copy_qformer_tokenizer(src, out)?;
        for f in crate::data::tokenizer::ASSET_FILES {
            let p = src.join(f);
            if p.exists() && src != out {
                std::fs::copy(&p, out.join(f)).map_err(|source| Error::Io {
                    path: p.clone(),
                    source,
                })?;
            }
        }
    }
    Ok(())
}
