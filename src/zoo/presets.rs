//! Named presets for fresh components (recipes pick one and override a few fields; STYLE principle 3).
//! Real-model presets carry the published dimensions; `shapes` sizes the quickstart world's tiny models, `bench-*`
//! are the benchmark presets of issue 3.
use crate::zoo::encoders::{Dinov2Spec, EncoderFamily, VisionSpec, VitFamily, VitSpec};
use crate::zoo::layers::act::Act;
use crate::zoo::layers::rope::{Rope, RopeScaling};
use crate::zoo::llms::{LlmFamily, LlmSpec};

pub const ENCODER_PRESETS: [&str; 9] = [
    "shapes",
    "bench-tiny",
    "bench-small",
    "clip-vit-b16",
    "clip-vit-l14-336",
    "dinov2-vit-s14",
    "dinov2-vit-b14",
    "dinov2-vit-l14",
    "eva-vit-g14",
];
pub const LLM_PRESETS: [&str; 5] = [
    "shapes",
    "bench-tiny",
    "bench-small",
    "tinyllama-1.1b",
    "llama-7b",
];

/// (hidden, intermediate, layers, heads, patch, image size)
pub fn encoder(name: &str, family: VitFamily) -> Option<VitSpec> {
    let (d, f, l, h, p, s) = match name {
        "shapes" => (64, 192, 3, 4, 8, 32),
        "bench-tiny" => (32, 64, 3, 2, 8, 32),
        "bench-small" => (384, 1536, 12, 6, 16, 224),
        "clip-vit-b16" => (768, 3072, 12, 12, 16, 224),
        "clip-vit-l14-336" => (1024, 4096, 24, 16, 14, 336),
        _ => return None,
    };
    Some(VitSpec {
        family,
        hidden_size: d,
        intermediate_size: f,
        num_layers: l,
        num_heads: h,
        num_channels: 3,
        patch_size: p,
        image_size: s,
        input_size: s,
        layer_norm_eps: if family == VitFamily::Clip {
            1e-5
        } else {
            1e-6
        },
        act: if family == VitFamily::Clip {
            Act::QuickGelu
        } else {
            Act::GeluTanh
        },
    })
}

/// A fresh encoder of `family` from a preset name (CLIP/SigLIP presets as `encoder`; DINOv2: `shapes`,
/// `bench-tiny` and the published `dinov2-vit-s14`, `dinov2-vit-b14`, `dinov2-vit-l14` at 224 px).
pub fn vision(name: &str, family: EncoderFamily) -> Option<VisionSpec> {
    match family {
        EncoderFamily::ClipVit => encoder(name, VitFamily::Clip).map(VisionSpec::Vit),
        EncoderFamily::SiglipVit => encoder(name, VitFamily::Siglip).map(VisionSpec::Vit),
        // a fused encoder is built from its towers' presets
        EncoderFamily::Fused => None,
        // Qwen2-VL's tower comes with its checkpoint (`model.from`)
        EncoderFamily::Qwen2Vit => None,
        EncoderFamily::BlipVision => {
            let (d, f, l, h, p, s) = match name {
                "shapes" => (64, 192, 3, 4, 16, 32),
                "bench-tiny" => (32, 64, 3, 2, 8, 32),
                // EVA-CLIP ViT-g/14 as BLIP-2 / InstructBLIP release it
                "eva-vit-g14" => (1408, 6144, 39, 16, 14, 224),
                _ => return None,
            };
            Some(VisionSpec::Blip(crate::zoo::encoders::BlipSpec {
                model_type: "blip_2_vision_model".into(),
                hidden_size: d,
                intermediate_size: f,
                num_layers: l,
                num_heads: h,
                patch_size: p,
                image_size: s,
                input_size: s,
                layer_norm_eps: 1e-6,
                act: Act::Gelu,
                qkv_bias: true,
            }))
        }
        EncoderFamily::Dinov2 => {
            let (d, l, h, p, s) = match name {
                "shapes" => (64, 3, 4, 16, 32),
                "bench-tiny" => (32, 3, 2, 8, 32),
                "dinov2-vit-s14" => (384, 12, 6, 14, 224),
                "dinov2-vit-b14" => (768, 12, 12, 14, 224),
                "dinov2-vit-l14" => (1024, 24, 16, 14, 224),
                _ => return None,
            };
            Some(VisionSpec::Dinov2(Dinov2Spec {
                hidden_size: d,
                intermediate_size: 4 * d,
                num_layers: l,
                num_heads: h,
                num_channels: 3,
                patch_size: p,
                image_size: s,
                input_size: s,
                layer_norm_eps: 1e-6,
                act: Act::Gelu,
                qkv_bias: true,
                layerscale_value: 1.0,
                registers: 0,
            }))
        }
    }
}

/// (hidden, intermediate, layers, heads, kv heads, tied); the vocabulary comes from the tokenizer.
pub fn llm(name: &str, family: LlmFamily, vocab_size: usize) -> Option<LlmSpec> {
    let (d, f, l, h, kv, tied) = match name {
        "shapes" => (128, 384, 4, 4, 2, true),
        "bench-tiny" => (48, 96, 2, 4, 2, true),
        "bench-small" => (768, 2048, 8, 12, 4, false),
        "tinyllama-1.1b" => (2048, 5632, 22, 32, 4, false),
        "llama-7b" => (4096, 11008, 32, 32, 32, false),
        _ => return None,
    };
    Some(LlmSpec {
        family,
        vocab_size,
        hidden_size: d,
        intermediate_size: f,
        num_layers: l,
        num_heads: h,
        num_kv_heads: kv,
        head_dim: d / h,
        rms_norm_eps: 1e-6,
        act: Act::Silu,
        rope: Rope {
            mrope_section: None,
            theta: 10000.0,
            head_dim: d / h,
            scaling: RopeScaling::Default {},
        },
        qkv_bias: family == LlmFamily::Qwen2,
        o_bias: false,
        mlp_bias: false,
        tie_word_embeddings: tied,
        max_position_embeddings: 2048,
        bos_token_id: None,
        eos_token_ids: vec![],
        pad_token_id: None,
    })
}
