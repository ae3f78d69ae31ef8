//! Composing a LLaVA model from standalone transformers directories (CLIPVisionModel / SiglipVisionModel +
//! LlamaForCausalLM / Qwen2ForCausalLM) with a fresh connector: the parts load exactly (same logits as the full
//! checkpoint once the connector is copied in) and the connector really is fresh.
mod common;

use burn::tensor::Device;
use common::*;
use mitune::checkpoint::hf::llava_spec;
use mitune::checkpoint::{Composition, compose_llava, load_llava};
use mitune::zoo::connectors::ConnectorSpec;
use mitune::zoo::layers::act::Act;
use mitune::zoo::layers::to_vec;

#[test]
fn compose_from_standalone_parts() {
    let device = Device::flex();
    for name in MODELS {
        let full = load_llava(&fixture(name), &device).unwrap();
        let spec = llava_spec(&fixture(name)).unwrap();
        let parts = fixture(&format!("{name}_parts"));
        let c = Composition {
            encoder: &parts.join("encoder"),
            llm: &parts.join("llm"),
            connector: ConnectorSpec::Mlp {
                depth: 2,
                act: Act::Gelu,
            },
            select: spec.select.clone(),
            image_size: None,
            image_token_id: spec.image_token_id,
        };
        let mut composed = compose_llava(&c, &device).unwrap();
        let fresh = to_vec(
            composed.multi_modal_projector.as_mlp().unwrap().layers[0]
                .weight
                .val(),
        );
        let trained = to_vec(
            full.multi_modal_projector.as_mlp().unwrap().layers[0]
                .weight
                .val(),
        );
        assert!(
            max_abs_diff(&fresh, &trained) > 1e-3,
            "{name}: connector should be freshly initialized"
        );
        composed.multi_modal_projector = full.multi_modal_projector.clone();
        let err = image_text_logit_error(&composed, &expected(name), &device);
        assert!(err < 1e-4, "{name}: composed model max |Δlogit| = {err}");
    }
}

/// Direct scaling of the input resolution: 64 px inputs on 32 px encoders interpolate the position embeddings
/// (4× the image tokens); selected features match transformers' `interpolate_pos_encoding=True` within 1e-4.
#[test]
fn compose_at_higher_resolution_matches_transformers() {
    let device = Device::flex();
    for name in MODELS {
        let spec = llava_spec(&fixture(name)).unwrap();
        let parts = fixture(&format!("{name}_parts"));
        let c = Composition {
            encoder: &parts.join("encoder"),
            llm: &parts.join("llm"),
            connector: ConnectorSpec::Linear {},
            select: spec.select.clone(),
            image_size: Some(64),
            image_token_id: spec.image_token_id,
        };
        let m = compose_llava(&c, &device).unwrap();
        assert_eq!(
            m.spec.image_tokens(),
            4 * spec.image_tokens(),
            "{name}: tokens at 64 px"
        );
        let e = expected(name);
        let got = m
            .vision_tower
            .features(
                pixels(&e, "hires.pixel_values", &device),
                &m.spec.select,
                &m.spec.vision,
            )
            .unwrap();
        let (ws, want) = e.tensor("hires.features");
        assert_eq!(got.dims().to_vec(), ws, "{name}: feature shape");
        let err = max_abs_diff(&to_vec(got), &want);
        eprintln!("{name}: 64 px features max |Δ| = {err:.2e}");
        assert!(
            err < 1e-4,
            "{name}: interpolated-position features max |Δ| = {err}"
        );
    }
}

/// Connectors transformers' 2-layer projector cannot hold (linear, 3-layer MLP) save with LLaVA's
/// `mm_projector_type` and load back into mitune with the same logits.
#[test]
fn other_connectors_round_trip_through_mm_projector_type() {
    let device = Device::flex();
    let name = MODELS[0];
    let spec = llava_spec(&fixture(name)).unwrap();
    let parts = fixture(&format!("{name}_parts"));
    for (connector, tag) in [
        (ConnectorSpec::Linear {}, "linear"),
        (
            ConnectorSpec::Mlp {
                depth: 3,
                act: Act::Gelu,
            },
            "mlp3x_gelu",
        ),
    ] {
        let c = Composition {
            encoder: &parts.join("encoder"),
            llm: &parts.join("llm"),
            connector,
            select: spec.select.clone(),
            image_size: None,
            image_token_id: spec.image_token_id,
        };
        let m = compose_llava(&c, &device).unwrap();
        let out = scratch(&format!("connector-{tag}"));
        mitune::checkpoint::save_llava(&m, &out, safetensors::Dtype::F32, None).unwrap();
        let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(
            cfg.contains(&format!("\"mm_projector_type\": \"{tag}\"")),
            "{cfg}"
        );
        let back = load_llava(&out, &device).unwrap();
        let e = expected(name);
        let a = image_text_logit_error(&m, &e, &device);
        let b = image_text_logit_error(&back, &e, &device);
        assert_eq!(a, b, "{tag}: reloaded model differs");
    }
}
