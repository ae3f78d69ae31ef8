//! The `Qwen2VLForConditionalGeneration` layout (Wang et al. 2024; transformers `modeling_qwen2_vl.py`) on mitune's
//! encoder → connector → LLM model: the native-resolution ViT is the encoder (`visual.*` without its merger), the
//! 2×2 patch merger is the connector (`visual.merger.*`), the Qwen2 LLM with M-RoPE is `model.*` + `lm_head`
//! (transformers 4.x hub layout, which mitune writes; 5.x's `model.visual.*` / `model.language_model.*` is read
//! too). The resize budget (min/max pixels) is the processor's, read from the directory's processor config.
use serde_json::{Value, json};
use std::path::Path;

use crate::error::{Error, Result};
use crate::zoo::connectors::{ConnectorSpec, MergerSpec};
use crate::zoo::encoders::{FeatureSelect, VisionSpec};
use crate::zoo::llms::LlmSpec;
use crate::zoo::mllm::LlavaSpec;
use crate::zoo::native::{NativeRes, VideoRes};

pub fn is_qwen2vl(spec: &LlavaSpec) -> bool {
    spec.native.is_some()
}

/// The spec a `qwen2_vl` config.json describes; `processor`: the directory's image processor json (for the
/// min/max pixel budget), `Null` for the released defaults; `video`: its video processor json, or `Null`.
pub fn spec(v: &Value, path: &Path, processor: &Value, video: &Value) -> Result<LlavaSpec> {
    let vc = v.get("vision_config").unwrap_or(&Value::Null);
    let vision = VisionSpec::from_hf(vc, path, "vision_config.")?;
    let VisionSpec::Qwen2Vit(vit) = &vision else {
        return Err(Error::key(
            path,
            "vision_config.model_type",
            "a Qwen2-VL checkpoint needs its qwen2_vl vision tower",
        ));
    };
    // 5.x nests the text model under `text_config`; 4.x hub configs keep it at the top level
    let (text, prefix) = match v.get("text_config") {
        Some(t) if t.is_object() => (t.clone(), "text_config."),
        _ => {
            let mut t = v.clone();
            t["model_type"] = "qwen2".into();
            if t.get("rope_parameters").is_none()
                && let Some(r) = v.get("rope_scaling")
            {
                t["rope_parameters"] = r.clone();
                t["rope_parameters"]["rope_theta"] =
                    v.get("rope_theta").cloned().unwrap_or(json!(1000000.0));
            }
            (t, "")
        }
    };
    let llm = LlmSpec::from_hf(
        &text,
        path,
        prefix,
        v.get("tie_word_embeddings").and_then(Value::as_bool),
    )?;
    let id = |k: &str| v.get(k).and_then(Value::as_i64);
    let image_token_id =
        id("image_token_id").ok_or_else(|| Error::key(path, "image_token_id", "missing"))?;
    // the processor's pixel budget: 5.x `size.{shortest,longest}_edge`, 4.x `min_pixels`/`max_pixels`
    let budget = |edge: &str, old: &str, default: u64| {
        processor
            .get("size")
            .and_then(|s| s.get(edge))
            .or_else(|| processor.get(old))
            .and_then(Value::as_u64)
            .unwrap_or(default)
    };
    let native = NativeRes {
        patch: vit.patch_size as u32,
        merge: vit.spatial_merge_size as u32,
        temporal: vit.temporal_patch_size as u32,
        min_pixels: budget("shortest_edge", "min_pixels", 56 * 56),
        max_pixels: budget("longest_edge", "max_pixels", 28 * 28 * 1280),
        vision_start_id: id("vision_start_token_id"),
        vision_end_id: id("vision_end_token_id"),
        video_token_id: id("video_token_id"),
        video: video_res(video, processor, vit.tokens_per_second),
    };
    let spec = LlavaSpec {
        connector: ConnectorSpec::Merger(MergerSpec {
            merge: vit.spatial_merge_size,
            rms_norm: vit.is_v25(),
        }),
        vision,
        // the last block's output, every patch (the merger normalises it)
        select: FeatureSelect {
            layers: vec![-1],
            drop_cls: false,
            post_norm: false,
        },
        projector_bias: true,
        llm,
        image_token_id,
        anyres: None,
        native: Some(native),
    };
    spec.validate().map_err(|m| Error::file(path, m))?;
    Ok(spec)
}

/// The clip settings of a checkpoint: its video processor json (`video_preprocessor_config.json`), else its image
/// processor's budget (what transformers falls back to for a directory without one), else the video processor's
/// defaults.
fn video_res(video: &Value, image: &Value, tokens_per_second: Option<f64>) -> VideoRes {
    let d = VideoRes::default();
    let src = if video.is_object() { video } else { image };
    let size = |edge: &str, old: &str, default: u64| {
        src.get("size")
            .and_then(|s| s.get(edge))
            .or_else(|| src.get(old))
            .and_then(Value::as_u64)
            .unwrap_or(default)
    };
    let count = |k: &str, default: usize| {
        video
            .get(k)
            .and_then(Value::as_u64)
            .map_or(default, |x| x as usize)
    };
    VideoRes {
        min_pixels: size("shortest_edge", "min_pixels", d.min_pixels),
        max_pixels: size("longest_edge", "max_pixels", d.max_pixels),
        fps: video.get("fps").and_then(Value::as_f64).unwrap_or(d.fps),
        min_frames: count("min_frames", d.min_frames),
        max_frames: count("max_frames", d.max_frames),
        tokens_per_second,
        cap_pixels_per_frame: video
            .get("cap_pixels_per_frame")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_video_tokens: count("max_video_tokens", d.max_video_tokens),
        frame_rate: None,
    }
}

/// `video_preprocessor_config.json` for a saved model: the clip settings it was trained with, and the image
/// processor's normalisation.
pub fn video_processor(n: &NativeRes, image: &Value) -> Value {
    let v = &n.video;
    let mut out = json!({
        "video_processor_type": "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": v.min_pixels, "longest_edge": v.max_pixels},
        "patch_size": n.patch,
        "temporal_patch_size": n.temporal,
        "merge_size": n.merge,
        "fps": v.fps,
        "min_frames": v.min_frames,
        "max_frames": v.max_frames,
        "cap_pixels_per_frame": v.cap_pixels_per_frame,
        "max_video_tokens": v.max_video_tokens,
        "do_resize": true,
        "resample": 3,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "do_convert_rgb": true,
    });
    for k in ["image_mean", "image_std", "resample", "rescale_factor"] {
        if let Some(x) = image.get(k) {
            out[k] = x.clone();
        }
    }
    out
}

/// The config.json transformers reads for this model (5.x layout: `text_config` nested).
pub fn config(spec: &LlavaSpec) -> Value {
    let v25 = matches!(&spec.vision, VisionSpec::Qwen2Vit(v) if v.is_v25());
    let (arch, mt) = if v25 {
        ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl")
    } else {
        ("Qwen2VLForConditionalGeneration", "qwen2_vl")
    };
    let mut text = spec.llm.to_hf();
    text["model_type"] = format!("{mt}_text").into();
    let mut vision = spec.vision.to_hf();
    vision["model_type"] = mt.into();
    let n = spec.native.as_ref();
    json!({
        "architectures": [arch],
        "model_type": mt,
        "vision_config": vision,
        "text_config": text,
        "image_token_id": spec.image_token_id,
        "video_token_id": n.and_then(|n| n.video_token_id),
        "vision_start_token_id": n.and_then(|n| n.vision_start_id),
        "vision_end_token_id": n.and_then(|n| n.vision_end_id),
        "tie_word_embeddings": spec.llm.tie_word_embeddings,
        "dtype": "float32",
    })
}
