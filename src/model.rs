//! The recipe's `[model]` section → a model plus its processors: a whole LLaVA directory (`from`), or encoder /
//! connector / LLM each from a weights directory or fresh from a preset (prismatic-style composition). Also writes
//! a trained model back as an HF directory with everything `mitune generate` and transformers need.
use burn::tensor::Device;
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::checkpoint::hf::{
    Part, config_of, llava_spec, load_parts, read_processor, save_part, write_json,
};
use crate::checkpoint::{load_llava, save_llava};
use crate::data::images::ImageProcessor;
use crate::data::tokenizer::TextProcessor;
use crate::error::{Error, Result};
use crate::recipe::schema::{Budget, EncoderSpec, LlmSource, ModelSpec, Select};
use crate::zoo::anyres::AnyRes;
use crate::zoo::connectors::ConnectorSpec;
use crate::zoo::encoders::{EncoderFamily, FeatureSelect, VisionSpec};
use crate::zoo::layers::act::Act;
use crate::zoo::llms::LlmSpec;
use crate::zoo::mllm::{Llava, LlavaSpec};
use crate::zoo::presets;

pub struct Built {
    pub model: Llava,
    pub text: TextProcessor,
    pub images: ImageProcessor,
    /// The image processor's HF json (written as preprocessor_config.json on export).
    pub processor: Value,
}

fn processors(
    tok_dir: &Path,
    spec: &LlavaSpec,
    processor: Value,
    pad_to_square: bool,
) -> Result<(TextProcessor, ImageProcessor, Value)> {
    let mut text = TextProcessor::load(tok_dir, spec.image_token_id, spec.image_tokens())?;
    let mut images =
        ImageProcessor::from_hf(&processor, &tok_dir.join("preprocessor_config.json"))?;
    images.set_pad_to_square(pad_to_square);
    // AnyRes: tiles, placeholder counts and packing read the model's one geometry
    text.configure(spec);
    images.configure(spec);
    Ok((text, images, processor))
}

/// A LlavaForConditionalGeneration directory with its tokenizer and processor (`from = DIR`, stage outputs).
pub fn load_dir(dir: &Path, device: &Device) -> Result<Built> {
    let spec = llava_spec(dir)?;
    let model = load_llava(dir, device)?;
    let (text, images, processor) = processors(dir, &spec, read_processor(dir)?, false)?;
    Ok(Built {
        model,
        text,
        images,
        processor,
    })
}

fn encoder_spec(e: &EncoderSpec, key: &str) -> Result<(VisionSpec, Value)> {
    if e.kind == EncoderFamily::Fused {
        return fused_spec(e, key);
    }
    if e.towers.is_some() {
        return Err(Error::input(format!(
            "{key}.towers: only a `kind = \"fused\"` encoder has towers"
        )));
    }
    let (mut spec, processor) = match (&e.weights, &e.preset) {
        (Some(dir), None) => {
            let spec = crate::checkpoint::hf::vision_spec_of(dir)?;
            if spec.family() != e.kind {
                return Err(Error::input(format!(
                    "{key}.kind = {:?} but {} holds a {:?} encoder ({}): set kind to match the weights",
                    e.kind,
                    dir.display(),
                    spec.family(),
                    spec.hf_architecture()
                )));
            }
            let proc =
                read_processor(dir).unwrap_or_else(|_| spec.processor_json(spec.image_size()));
            (spec, proc)
        }
        (None, Some(p)) => {
            let spec = presets::vision(p, e.kind).ok_or_else(|| {
                Error::input(format!(
                    "{key}.preset = {p:?}: unknown preset for {:?} (known: {})",
                    e.kind,
                    presets::ENCODER_PRESETS.join(", ")
                ))
            })?;
            (spec, Value::Null)
        }
        _ => {
            return Err(Error::input(format!(
                "{key}: give exactly one of `weights` (a directory) or `preset`"
            )));
        }
    };
    let fresh = e.preset.is_some();
    let arch = [
        e.hidden_size,
        e.intermediate_size,
        e.num_layers,
        e.num_heads,
        e.patch_size,
    ];
    if arch.iter().any(Option::is_some) && !fresh {
        return Err(Error::input(format!(
            "{key}: architecture fields can only override a preset, not pretrained weights"
        )));
    }
    spec.set_arch(arch[0], arch[1], arch[2], arch[3], arch[4]);
    if let Some(s) = e.image_size {
        if s % spec.patch_size() != 0 {
            return Err(Error::input(format!(
                "{key}.image_size = {s} is not a multiple of the patch size {}",
                spec.patch_size()
            )));
        }
        spec.set_input_size(s, fresh);
    }
    spec.validate()
        .map_err(|m| Error::input(format!("{key}: {m}")))?;
    let processor = if processor.is_null() || e.image_size.is_some() {
        spec.processor_json(spec.input_size())
    } else {
        processor
    };
    Ok((spec, processor))
}

/// `kind = "fused"`: each tower from its own table (weights or preset), the outer `image_size` for all; one
/// image processor per tower.
fn fused_spec(e: &EncoderSpec, key: &str) -> Result<(VisionSpec, Value)> {
    let towers = match &e.towers {
        Some(t) if !t.is_empty() => t,
        _ => {
            return Err(Error::input(format!(
                "{key}.towers: a fused encoder needs its towers, e.g. towers = [{{ kind = \"dinov2\", weights = \"…\" }}, \
                 {{ kind = \"siglip_vit\", weights = \"…\" }}]"
            )));
        }
    };
    if e.weights.is_some() || e.preset.is_some() {
        return Err(Error::input(format!(
            "{key}: a fused encoder takes `weights`/`preset` per tower, not for the whole"
        )));
    }
    let mut specs = vec![];
    let mut procs = vec![];
    for (i, t) in towers.iter().enumerate() {
        let tkey = format!("{key}.towers[{i}]");
        if t.kind == EncoderFamily::Fused {
            return Err(Error::input(format!(
                "{tkey}: a tower cannot itself be fused"
            )));
        }
        // the outer `feature_layer` / `select` apply to every tower: a tower's own would be silently unused
        if t.feature_layer != -2 || t.select != Select::Patch {
            return Err(Error::input(format!(
                "{tkey}: `feature_layer` and `select` are set on the fused encoder ({key}), not per tower"
            )));
        }
        let mut t = t.clone();
        if let Some(s) = e.image_size {
            t.image_size = Some(s);
        }
        let (spec, proc) = encoder_spec(&t, &tkey)?;
        specs.push(spec);
        procs.push(proc);
    }
    let spec = VisionSpec::Fused(crate::zoo::encoders::FusedSpec { towers: specs });
    spec.validate()
        .map_err(|m| Error::input(format!("{key}: {m}")))?;
    Ok((spec, crate::zoo::encoders::fused::processor_json(procs)))
}

fn llm_spec(l: &LlmSource, key: &str) -> Result<(LlmSpec, PathBuf)> {
    let family = l.kind;
    match (&l.weights, &l.preset) {
        (Some(dir), None) => {
            let (path, cfg) = config_of(dir)?;
            let spec = LlmSpec::from_hf(&cfg, &path, "", None)?;
            Ok((spec, l.tokenizer.clone().unwrap_or_else(|| dir.clone())))
        }
        (None, Some(p)) => {
            let tok_dir = l.tokenizer.clone().ok_or_else(|| {
                Error::input(format!(
                    "{key}: a fresh LLM needs `tokenizer = DIR` (a directory with tokenizer.json)"
                ))
            })?;
            let tok = TextProcessor::load(&tok_dir, 0, 1)?;
            let mut spec = presets::llm(p, family, tok.vocab_size()).ok_or_else(|| {
                Error::input(format!(
                    "{key}.preset = {p:?}: unknown preset (known: {})",
                    presets::LLM_PRESETS.join(", ")
                ))
            })?;
            for (v, slot) in [
                (l.hidden_size, &mut spec.hidden_size),
                (l.intermediate_size, &mut spec.intermediate_size),
                (l.num_layers, &mut spec.num_layers),
                (l.num_heads, &mut spec.num_heads),
                (l.num_kv_heads, &mut spec.num_kv_heads),
            ] {
                if let Some(v) = v {
                    *slot = v;
                }
            }
            spec.head_dim = spec.hidden_size / spec.num_heads;
            spec.rope.head_dim = spec.head_dim;
            if let Some(t) = l.tie_word_embeddings {
                spec.tie_word_embeddings = t;
            }
            spec.bos_token_id = tok.bos_token.as_deref().and_then(|t| tok.token_id(t));
            spec.eos_token_ids = tok.eos_token_id.into_iter().collect();
            spec.pad_token_id = tok.token_id("<pad>");
            Ok((spec, tok_dir))
        }
        _ => Err(Error::input(format!(
            "{key}: give exactly one of `weights` (a directory) or `preset`"
        ))),
    }
}

/// The model the recipe describes, without weights: its spec (validated: connector, feature layers, heads), the
/// directory of its tokenizer and its image processor's json. Reads config files only, so `mitune validate`
/// reports a connector that cannot take the encoder's features before any tensor is made.
pub fn plan(m: &ModelSpec) -> Result<(LlavaSpec, PathBuf, Value)> {
    if let Some(dir) = &m.from {
        if m.anyres.is_some() {
            return Err(Error::input(format!(
                "model.anyres: {} carries its own tiling (image_grid_pinpoints in its config.json); [model.anyres] \
                 applies to a model composed from an encoder and an LLM",
                dir.display()
            )));
        }
        let mut spec = llava_spec(dir)?;
        let mut processor = read_processor(dir)?;
        pixel_budget(m, &mut spec, &mut processor)?;
        return Ok((spec, dir.clone(), processor));
    }
    let (Some(e), Some(l)) = (&m.encoder, &m.llm) else {
        return Err(Error::input(
            "model: give `from = DIR` or both [model.encoder] and [model.llm]",
        ));
    };
    let (vision, processor) = encoder_spec(e, "model.encoder")?;
    // AnyRes tiles are the encoder's input size, each giving its patch grid
    let anyres = m.anyres.as_ref().map(|a| AnyRes {
        pinpoints: a.pinpoints.clone(),
        tile: vision.input_size() as u32,
        grid: (vision.input_size() / vision.patch_size().max(1)) as u32,
        max_tiles: a.max_tiles,
        single_tile_in_multi: a.max_tiles.is_some(),
    });
    let (llm, tok_dir) = llm_spec(l, "model.llm")?;
    let probe = TextProcessor::load(&tok_dir, 0, 1)?;
    let image_token_id = probe.token_id("<image>").ok_or_else(|| {
        Error::file(
            tok_dir.join("tokenizer.json"),
            "the tokenizer has no `<image>` token: add it as a special token (and resize the embeddings) first",
        )
    })?;
    let spec = LlavaSpec {
        vision,
        select: FeatureSelect {
            layers: vec![e.feature_layer],
            // SigLIP has no CLS: `patch` keeps all its tokens (transformers' `default` would drop one)
            drop_cls: e.select == Select::Patch && e.kind != EncoderFamily::SiglipVit,
            // BLIP-2 / InstructBLIP read their tower's last layer after `post_layernorm`
            post_norm: e.kind == EncoderFamily::BlipVision,
        },
        connector: m.connector.clone().unwrap_or(ConnectorSpec::Mlp {
            depth: 2,
            act: Act::Gelu,
        }),
        projector_bias: true,
        llm,
        image_token_id,
        anyres,
        native: None,
    };
    if let Err(msg) = spec.connector.out_tokens(&spec.features()) {
        let f = spec.features();
        return Err(Error::input(format!(
            "model.connector (kind = \"{}\"): {msg} [the encoder gives {} tokens of width {} per image{}]",
            spec.connector.kind(),
            f.tokens,
            f.width,
            f.grid
                .map(|(h, w)| format!(", a {h}×{w} patch grid"))
                .unwrap_or_default()
        )));
    }
    let mut spec = spec;
    let mut processor = processor;
    pixel_budget(m, &mut spec, &mut processor)?;
    let key = if m.anyres.is_some() {
        "model.anyres"
    } else {
        "model"
    };
    spec.validate()
        .map_err(|msg| Error::input(format!("{key}: {msg}")))?;
    Ok((spec, tok_dir, processor))
}

/// `model.min_pixels` / `model.max_pixels` (and the clip settings) over a native-resolution checkpoint's; the
/// processor json written with stage outputs carries them.
fn pixel_budget(m: &ModelSpec, spec: &mut LlavaSpec, processor: &mut Value) -> Result<()> {
    apply_budget(&m.budget(), "model", spec, processor)
}

/// Sets a native-resolution model's image pixel budget and clip settings (`key`: where the recipe says so, for
/// errors); no change when the recipe sets none.
pub fn apply_budget(
    b: &Budget,
    key: &str,
    spec: &mut LlavaSpec,
    processor: &mut Value,
) -> Result<()> {
    if b.is_empty() {
        return Ok(());
    }
    let Some(n) = spec.native.as_mut() else {
        return Err(Error::input(crate::zoo::native::budget_needs_native(key)));
    };
    *n = n
        .with_budget(b)
        .map_err(|msg| Error::input(format!("{key}.{msg}")))?;
    if let Some(p) = processor.as_object_mut() {
        p.insert(
            "size".into(),
            serde_json::json!({"shortest_edge": n.min_pixels, "longest_edge": n.max_pixels}),
        );
        p.insert("min_pixels".into(), n.min_pixels.into());
        p.insert("max_pixels".into(), n.max_pixels.into());
    }
    Ok(())
}

/// A stage's own budget (`stages.NAME.data.min_pixels / max_pixels / fps / max_frames / ...`) on the built
/// model: the model's spec (placeholder counts and grids), both processors and the processor json its outputs
/// carry.
pub fn stage_budget(b: &mut Built, budget: &Budget, key: &str) -> Result<()> {
    if budget.is_empty() {
        return Ok(());
    }
    let mut spec = b.model.spec.clone();
    apply_budget(budget, key, &mut spec, &mut b.processor)?;
    b.text.configure(&spec);
    b.images.configure(&spec);
    b.model.spec = spec;
    Ok(())
}

/// Builds the model the recipe describes; weights load for the parts that name a directory.
pub fn build(m: &ModelSpec, pad_to_square: bool, device: &Device) -> Result<Built> {
    if let Some(dir) = &m.from {
        let mut b = load_dir(dir, device)?;
        b.images.set_pad_to_square(pad_to_square);
        if !m.budget().is_empty() {
            let mut spec = b.model.spec.clone();
            pixel_budget(m, &mut spec, &mut b.processor)?;
            b.text.configure(&spec);
            b.images.configure(&spec);
            b.model.spec = spec;
        }
        return Ok(b);
    }
    let (spec, tok_dir, processor) = plan(m)?;
    let (e, l) = (m.encoder.as_ref(), m.llm.as_ref());
    let mut model = load_parts(
        crate::init_portable(device, |d| spec.init(d)),
        e.and_then(|e| e.weights.as_deref()),
        l.and_then(|l| l.weights.as_deref()),
        device,
    )?;
    for (i, t) in e
        .and_then(|e| e.towers.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(dir) = &t.weights {
            model = crate::checkpoint::hf::load_tower(model, i, dir, device)?;
        }
    }
    let (text, images, processor) = processors(&tok_dir, &spec, processor, pad_to_square)?;
    Ok(Built {
        model,
        text,
        images,
        processor,
    })
}

/// Writes the model (HF LLaVA layout, or one standalone part) with tokenizer, processor and the chat template
/// it was trained with.
pub fn export(
    model: &Llava,
    text: &TextProcessor,
    processor: &Value,
    template: Option<&str>,
    part: Option<(Part, safetensors::Dtype)>,
    out: &Path,
) -> Result<()> {
    // data parallel: rank 0 alone writes models and checkpoints (every rank holds the same weights)
    if !crate::dist::writer() {
        return Ok(());
    }
    let part = match part {
        None => {
            save_llava(model, out, safetensors::Dtype::F32, None)?;
            None
        }
        Some((p, dtype)) => {
            save_part(model, p, out, dtype)?;
            Some(p)
        }
    };
    if part != Some(Part::Encoder) {
        text.save_files(out)?;
        if let Some(t) = template {
            let p = out.join("chat_template.jinja");
            std::fs::write(&p, t).map_err(|source| Error::Io { path: p, source })?;
        }
        let base = out.join(crate::data::tokenizer::BASE_TEMPLATE_FILE);
        match &text.base_chat_template {
            Some(b) if Some(b.as_str()) != template => {
                std::fs::write(&base, b).map_err(|source| Error::Io { path: base, source })?
            }
            _ if base.exists() => {
                std::fs::remove_file(&base).map_err(|source| Error::Io { path: base, source })?
            }
            _ => {}
        }
    }
    if part != Some(Part::Llm) {
        let mut processor = processor.clone();
        // an AnyRes model's processor is LLaVA-NeXT's, with the pinpoints the model was trained with
        if let (Some(a), Some(p)) = (&model.spec.anyres, processor.as_object_mut()) {
            let t = if a.single_tile_in_multi {
                "LlavaOnevisionImageProcessor"
            } else {
                "LlavaNextImageProcessor"
            };
            p.insert("image_processor_type".into(), t.into());
            p.insert(
                "image_grid_pinpoints".into(),
                serde_json::json!(a.pinpoints),
            );
            p.insert("do_pad".into(), true.into());
        }
        write_json(&out.join("preprocessor_config.json"), &processor)?;
        if let Some(n) = &model.spec.native {
            write_json(
                &out.join("video_preprocessor_config.json"),
                &crate::checkpoint::qwen2vl::video_processor(n, &processor),
            )?;
        }
    }
    Ok(())
}
