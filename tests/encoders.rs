//! DINOv2 towers against transformers (fixtures from tools/make_encoder_fixtures.py): a `Dinov2Model` and a
//! `Dinov2WithRegistersModel` directory as `save_pretrained` wrote it load by their own names and give every hidden
//! state and the final output within 1e-4 on two real photos, at the trained size and at twice it (interpolated
//! position embeddings). A DINOv2 encoder composes into a LLaVA with an LLM directory, saves and reloads with equal
//! logits, and exports back to a standalone directory.
mod common;

use burn::tensor::{Device, Tensor};
use common::{fixture, max_abs_diff};
use mitune::checkpoint::hf::{Part, save_part, vision_spec_of};
use mitune::checkpoint::params::Loader;
use mitune::checkpoint::safetensors_io::WeightStore;
use mitune::checkpoint::{Composition, compose_llava, load_llava, save_llava};
use mitune::zoo::connectors::ConnectorSpec;
use mitune::zoo::encoders::{Encoder, EncoderFamily, FeatureSelect, VisionSpec};
use mitune::zoo::keys;
use mitune::zoo::layers::{float_tensor, to_vec};
use mitune::zoo::mllm::MmInput;

fn load_tower(dir: &std::path::Path, device: &Device) -> (VisionSpec, Encoder) {
    let spec = vision_spec_of(dir).unwrap();
    let store = WeightStore::open_dir(dir).unwrap();
    let k: &dyn Fn(&str) -> Vec<String> = &keys::vision;
    let enc = Loader::new(&store, k, &[], device)
        .load(spec.init(device))
        .unwrap();
    (spec, enc)
}

fn tensor<const D: usize>(e: &WeightStore, key: &str, device: &Device) -> Tensor<D> {
    let l = e.get(key).unwrap();
    float_tensor(l.values, l.shape.try_into().unwrap(), device)
}

#[test]
fn dinov2_hidden_states_match_transformers() {
    let device = Device::flex();
    for name in ["dinov2", "dinov2_registers"] {
        let dir = fixture(name);
        let (mut spec, enc) = load_tower(&dir, &device);
        assert_eq!(spec.family(), EncoderFamily::Dinov2);
        let e = WeightStore::open_files(&[dir.join("expected.safetensors")]).unwrap();
        for (tag, scale) in [("", 1), ("hires.", 2)] {
            spec.set_input_size(spec.image_size() * scale, false);
            let px: Tensor<4> = tensor(&e, &format!("{tag}pixel_values"), &device);
            let states = enc.hidden_states(px.clone(), spec.num_layers());
            assert_eq!(
                states[0].dims()[1],
                spec.num_tokens(),
                "{name}{tag}: tokens"
            );
            for (i, s) in states.iter().enumerate() {
                let want = e.get(&format!("{tag}hidden_states.{i}")).unwrap().values;
                let err = max_abs_diff(&to_vec(s.clone()), &want);
                assert!(
                    err <= 1e-4,
                    "{name}{tag}: hidden_states.{i} differs by {err}"
                );
            }
            let want = e.get(&format!("{tag}last_hidden_state")).unwrap().values;
            let err = max_abs_diff(&to_vec(enc.forward(px)), &want);
            eprintln!("{name}{tag}: last_hidden_state max abs err {err:.2e}");
            assert!(
                err <= 1e-4,
                "{name}{tag}: last_hidden_state differs by {err}"
            );
        }
    }
}

/// DINOv2 + a LLaMA directory + a fresh connector: the LLaVA model saves (DINOv2 keys under `vision_tower.`)
/// and reloads with equal logits; its encoder exports as a standalone Dinov2 directory that loads back equal.
#[test]
fn dinov2_composes_into_llava_and_round_trips() {
    let device = Device::flex();
    let c = Composition {
        encoder: &fixture("dinov2"),
        llm: &fixture("llava_clip_llama_parts").join("llm"),
        connector: ConnectorSpec::Mlp {
            depth: 2,
            act: mitune::zoo::layers::act::Act::Gelu,
        },
        select: FeatureSelect {
            layers: vec![-2],
            drop_cls: true,
            post_norm: false,
        },
        image_size: None,
        image_token_id: 5,
    };
    let m = compose_llava(&c, &device).unwrap();
    assert_eq!(m.spec.image_tokens(), 16, "4×4 patches after the CLS token");
    let out = std::env::temp_dir().join(format!("mitune-dinov2-llava-{}", std::process::id()));
    save_llava(&m, &out, safetensors::Dtype::F32, None).unwrap();
    let store = WeightStore::open_dir(&out).unwrap();
    assert!(store.contains("vision_tower.encoder.layer.0.attention.attention.query.weight"));
    assert!(store.contains("vision_tower.embeddings.position_embeddings"));
    let back = load_llava(&out, &device).unwrap();
    let e = WeightStore::open_files(&[fixture("dinov2").join("expected.safetensors")]).unwrap();
    let px: Tensor<4> = tensor(&e, "pixel_values", &device);
    let px = px.slice([0..1, 0..3, 0..32, 0..32]);
    let mut ids = vec![1i64, 10, 11];
    ids.extend(std::iter::repeat_n(5, 16));
    ids.push(12);
    let a = to_vec(
        m.forward(&MmInput::single(ids.clone(), Some(px.clone())))
            .unwrap(),
    );
    let b = to_vec(
        back.forward(&MmInput::single(ids, Some(px.clone())))
            .unwrap(),
    );
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // kept (not removed) for tools/check_encoder_export.py, which loads it in transformers
    let part = std::env::temp_dir().join("mitune-dinov2-export");
    save_part(&m, Part::Encoder, &part, safetensors::Dtype::F32).unwrap();
    let (_, enc) = load_tower(&part, &device);
    let (_, orig) = load_tower(&fixture("dinov2"), &device);
    assert_eq!(
        max_abs_diff(&to_vec(enc.forward(px.clone())), &to_vec(orig.forward(px))),
        0.0
    );
    std::fs::remove_dir_all(&out).ok();
}

/// A two-step align stage on the tiny shapes world with `encoder` as the `[model.encoder]` table.
fn align_recipe(d: &std::path::Path, w: &std::path::Path, name: &str, encoder: &str) -> String {
    format!(
        r#"name = "{name}"
pipeline = ["align"]
output = {out:?}
[model.encoder]
{encoder}
[model.llm]
kind = "llama"
preset = "bench-tiny"
tokenizer = {tok:?}
[stages.align]
kind = "align"
data = {{ sources = [{{ kind = "llava_json", path = {cap:?} }}] }}
template = "plain"
batch = {{ global = 4, micro = 4 }}
optim = {{ kind = "adamw", lr = 3e-3 }}
max_steps = 2
max_len = 64
"#,
        out = d.join("runs").display().to_string(),
        tok = w.join("tokenizer").display().to_string(),
        cap = w.join("captions_train.json").display().to_string(),
    )
}

/// `[model.encoder] kind = "dinov2"` in a recipe: a fresh preset trains an align stage and saves a LLaVA directory
/// that reloads; naming the wrong family for a weights directory is a located error before any compute.
#[test]
fn dinov2_in_a_recipe_trains_and_wrong_kinds_are_named() {
    let d = common::scratch("dinov2-recipe");
    let w = common::world(&d);
    let recipe = |encoder: &str| align_recipe(&d, &w, "dino", encoder);
    let r = d.join("dino.toml");
    std::fs::write(
        &r,
        recipe("kind = \"dinov2\"\npreset = \"bench-tiny\"\nfeature_layer = -2"),
    )
    .unwrap();
    let (ok, err) = common::run_mitune(&["train", r.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let model = d.join("runs/dino/align/model");
    let spec = mitune::checkpoint::hf::llava_spec(&model).unwrap();
    assert_eq!(spec.vision.family(), EncoderFamily::Dinov2);
    load_llava(&model, &Device::flex()).unwrap();
    let bad = d.join("bad.toml");
    let weights = fixture("dinov2").display().to_string();
    std::fs::write(
        &bad,
        recipe(&format!("kind = \"clip_vit\"\nweights = {weights:?}")),
    )
    .unwrap();
    let (ok, err) = common::run_mitune(&["validate", bad.to_str().unwrap()], None);
    assert!(
        !ok && err.contains("model.encoder.kind") && err.contains("Dinov2"),
        "{err}"
    );
}

/// Prismatic's "dinosiglip" shape: a DINOv2 tower and a SigLIP tower from their own directories, fused. Each tower
/// keeps its own preprocessing (ImageNet vs 0.5 mean/std, stacked on the channel axis); the features are the towers'
/// selected patch features side by side (DINOv2 drops its CLS, SigLIP has none), exactly what each tower gives
/// alone; the model trains an align stage, saves in mitune's layout and reloads with equal logits. Towers that
/// disagree on the patch grid are a located error before any compute.
#[test]
fn fused_dinov2_siglip_encoder() {
    let d = common::scratch("fused");
    let w = common::world(&d);
    let dino = fixture("dinov2").display().to_string();
    let siglip = fixture("llava_siglip_qwen2_parts")
        .join("encoder")
        .display()
        .to_string();
    let recipe = |towers: &str, extra: &str| {
        let encoder = format!("kind = \"fused\"\nfeature_layer = -2\ntowers = [{towers}]\n{extra}");
        align_recipe(&d, &w, "fused", &encoder)
    };
    let towers = format!(
        "{{ kind = \"dinov2\", weights = {dino:?} }}, {{ kind = \"siglip_vit\", weights = {siglip:?} }}"
    );
    let r = d.join("fused.toml");
    std::fs::write(&r, recipe(&towers, "")).unwrap();
    let (ok, err) = common::run_mitune(&["validate", r.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let (ok, err) = common::run_mitune(&["train", r.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let device = Device::flex();
    let dir = d.join("runs/fused/align/model");
    let m = load_llava(&dir, &device).unwrap();
    assert_eq!(m.spec.vision.family(), EncoderFamily::Fused);
    assert_eq!(m.spec.image_tokens(), 16);
    assert_eq!(
        m.spec.features().width,
        64,
        "32 (DINOv2) + 32 (SigLIP) per patch"
    );
    // preprocessing: tower 0's channels are the DINOv2 processor's, tower 1's the SigLIP processor's
    let images = mitune::data::images::ImageProcessor::load(&dir).unwrap();
    assert_eq!(images.channels(), 6);
    let photo = fixture("images").join("astronaut_32.png");
    let px = images.batch(&[&photo], &device).unwrap().unwrap();
    let one = |p: &str| {
        let proc = mitune::data::images::ImageProcessor::from_hf(
            &m.spec.vision.processor_json(32)["towers"][if p == "dino" { 0 } else { 1 }],
            std::path::Path::new(""),
        )
        .unwrap();
        to_vec(proc.batch(&[&photo], &device).unwrap().unwrap())
    };
    let all = to_vec(px.clone());
    assert_eq!(&all[..3 * 32 * 32], &one("dino")[..]);
    assert_eq!(&all[3 * 32 * 32..], &one("siglip")[..]);
    // features: each tower's own selection, concatenated per patch
    let feats = to_vec(
        m.vision_tower
            .features(px.clone(), &m.spec.select, &m.spec.vision)
            .unwrap(),
    );
    let (Encoder::Fused(f), VisionSpec::Fused(fs)) = (&m.vision_tower, &m.spec.vision) else {
        panic!("not fused")
    };
    let tower = |i: usize, drop: usize| {
        let s =
            f.towers[i].hidden_states(px.clone().slice([0..1, 3 * i..3 * i + 3, 0..32, 0..32]), 2);
        let [n, t, dd] = s[2].dims();
        to_vec(s[2].clone().slice([0..n, drop..t, 0..dd]))
    };
    assert_eq!(fs.towers[0].num_layers(), 3);
    let (a, b) = (tower(0, 1), tower(1, 0));
    for p in 0..16 {
        assert_eq!(
            &feats[p * 64..p * 64 + 32],
            &a[p * 32..p * 32 + 32],
            "patch {p}: DINOv2 half"
        );
        assert_eq!(
            &feats[p * 64 + 32..p * 64 + 64],
            &b[p * 32..p * 32 + 32],
            "patch {p}: SigLIP half"
        );
    }
    // save / reload
    let out = d.join("saved");
    save_llava(&m, &out, safetensors::Dtype::F32, None).unwrap();
    let back = load_llava(&out, &device).unwrap();
    let mut ids = vec![1i64, 10];
    ids.extend(std::iter::repeat_n(m.spec.image_token_id, 16));
    let x = to_vec(
        m.forward(&MmInput::single(ids.clone(), Some(px.clone())))
            .unwrap(),
    );
    let y = to_vec(back.forward(&MmInput::single(ids, Some(px))).unwrap());
    assert_eq!(max_abs_diff(&x, &y), 0.0);
    // towers whose grids disagree: DINOv2 bench-tiny at 8 px patches vs a 16-px-patch CLIP preset
    let bad = d.join("bad.toml");
    let towers = "{ kind = \"dinov2\", preset = \"bench-tiny\" }, { kind = \"clip_vit\", preset = \"bench-tiny\", patch_size = 16 }";
    std::fs::write(&bad, recipe(towers, "")).unwrap();
    let (ok, err) = common::run_mitune(&["validate", bad.to_str().unwrap()], None);
    assert!(!ok && err.contains("disagree on the patch grid"), "{err}");
    let towers = "{ kind = \"dinov2\", preset = \"bench-tiny\", feature_layer = -1 }";
    std::fs::write(&bad, recipe(towers, "")).unwrap();
    let (ok, err) = common::run_mitune(&["validate", bad.to_str().unwrap()], None);
    assert!(
        !ok && err.contains("model.encoder.towers[0]") && err.contains("not per tower"),
        "{err}"
    );
}
