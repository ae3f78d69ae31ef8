//! Connectors against transformers' own modules (fixtures from tools/make_connector_fixtures.py): Idefics2's
//! perceiver resampler and Idefics3's pixel shuffle load from transformers' tensor names, give the same features
//! (≤ 1e-4) on a batch of two images, and the same weight gradients of sum(output · probe) (≤ 1e-3 relative).
//! Plus what no fixture needs: token counts, pooling by hand, and a save/reload of every kind through a LLaVA
//! directory with equal logits.
mod common;

use burn::module::Param;
use burn::tensor::{Device, Tensor};
use common::{fixture, max_abs_diff};
use mitune::checkpoint::params::Loader;
use mitune::checkpoint::safetensors_io::WeightStore;
use mitune::zoo::connectors::{Connector, ConnectorSpec, Features};
use mitune::zoo::layers::act::Act;
use mitune::zoo::layers::{float_tensor, to_vec};
use mitune::zoo::llms::{LlmFamily, LlmSpec};
use mitune::zoo::presets;

struct Fixture {
    store: WeightStore,
    config: serde_json::Value,
}

fn load(name: &str) -> Fixture {
    let path = fixture("connectors").join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config = serde_json::from_str(&meta.metadata().as_ref().unwrap()["config"]).unwrap();
    Fixture {
        store: WeightStore::open_files(&[path]).unwrap(),
        config,
    }
}

impl Fixture {
    fn tensor<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        let l = self.store.get(key).unwrap();
        float_tensor(l.values, l.shape.try_into().unwrap(), device)
    }
    fn usize(&self, key: &str) -> usize {
        self.config[key].as_u64().unwrap() as usize
    }
}

fn llm(hidden: usize, intermediate: usize, eps: f64) -> LlmSpec {
    let mut l = presets::llm("bench-tiny", LlmFamily::Llama, 64).unwrap();
    l.hidden_size = hidden;
    l.intermediate_size = intermediate;
    l.rms_norm_eps = eps;
    l.act = Act::Silu;
    l
}

/// Builds `spec` for the fixture's dims, loads transformers' tensors by their own names, and checks features and
/// the gradients of the named weights (`(transformers name, param, is a Linear weight)`).
fn check(
    name: &str,
    spec: ConnectorSpec,
    f: Features,
    llm: &LlmSpec,
    grads: impl Fn(&Connector) -> Vec<(&'static str, Param<Tensor<2>>, bool)>,
    norm_grads: impl Fn(&Connector) -> Vec<(&'static str, Param<Tensor<1>>)>,
) {
    let device = Device::flex().autodiff();
    let fx = load(name);
    assert_eq!(
        spec.out_tokens(&f).unwrap(),
        fx.store.shape("output").unwrap()[1]
    );
    let identity: &dyn Fn(&str) -> Vec<String> = &|p| vec![p.to_string()];
    let c = Loader::new(&fx.store, identity, &[], &device)
        .load_part(spec.init(&f, llm, false, &device))
        .unwrap();
    let x: Tensor<3> = fx.tensor("input", &device);
    let out = c.forward(x);
    let want: Tensor<3> = fx.tensor("output", &device);
    let err = max_abs_diff(&to_vec(out.clone()), &to_vec(want));
    eprintln!("{name}: features max abs err {err:.2e}");
    assert!(err <= 1e-4, "{name}: features differ by {err}");
    let probe: Tensor<3> = fx.tensor("probe", &device);
    let g = (out * probe).sum().backward();
    let rel = |got: Vec<f32>, key: &str| {
        let want = fx.store.get(&format!("grad.{key}")).unwrap().values;
        let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        max_abs_diff(&got, &want) / scale
    };
    for (key, p, linear) in grads(&c) {
        let t = p.val().grad(&g).expect("weight has a gradient");
        let t = if linear { t.transpose() } else { t }; // burn Linear [in, out] -> torch [out, in]
        let r = rel(to_vec(t), key);
        eprintln!("{name}: grad {key} rel err {r:.2e}");
        assert!(r <= 1e-3, "{name}: gradient of {key}: relative error {r}");
    }
    for (key, p) in norm_grads(&c) {
        let r = rel(to_vec(p.val().grad(&g).expect("norm has a gradient")), key);
        eprintln!("{name}: grad {key} rel err {r:.2e}");
        assert!(r <= 1e-3, "{name}: gradient of {key}: relative error {r}");
    }
}

#[test]
fn idefics2_perceiver_resampler_matches_transformers() {
    let fx = load("idefics2");
    let spec: ConnectorSpec = serde_json::from_value(serde_json::json!({
        "kind": "resampler", "latents": fx.usize("latents"), "depth": fx.usize("depth"),
        "heads": fx.usize("heads"), "kv_heads": fx.usize("kv_heads"), "head_dim": fx.usize("head_dim"),
        "act": "silu",
    }))
    .unwrap();
    let tokens = fx.store.shape("input").unwrap()[1];
    let f = Features {
        tokens,
        width: fx.usize("vision_hidden"),
        grid: None,
    };
    let llm = llm(
        fx.usize("hidden_size"),
        fx.usize("intermediate_size"),
        fx.config["rms_norm_eps"].as_f64().unwrap(),
    );
    check(
        "idefics2",
        spec,
        f,
        &llm,
        |c| {
            let Connector::Resampler(r) = c else {
                panic!("not a resampler")
            };
            let l1 = &r.perceiver_resampler.layers[1];
            vec![
                (
                    "modality_projection.gate_proj.weight",
                    r.modality_projection.gate_proj.weight.clone(),
                    true,
                ),
                (
                    "perceiver_resampler.latents",
                    r.perceiver_resampler.latents.clone(),
                    false,
                ),
                (
                    "perceiver_resampler.layers.1.self_attn.k_proj.weight",
                    l1.self_attn.k_proj.weight.clone(),
                    true,
                ),
                (
                    "perceiver_resampler.layers.1.mlp.down_proj.weight",
                    l1.mlp.down_proj.weight.clone(),
                    true,
                ),
            ]
        },
        |c| {
            let Connector::Resampler(r) = c else {
                panic!("not a resampler")
            };
            vec![(
                "perceiver_resampler.layers.0.input_context_norm.weight",
                r.perceiver_resampler.layers[0]
                    .input_context_norm
                    .gamma
                    .clone(),
            )]
        },
    );
}

#[test]
fn idefics3_pixel_shuffle_matches_transformers() {
    let fx = load("idefics3");
    let g = fx.usize("grid");
    let spec: ConnectorSpec = serde_json::from_value(
        serde_json::json!({"kind": "pixel_shuffle", "scale": fx.usize("scale")}),
    )
    .unwrap();
    let f = Features {
        tokens: g * g,
        width: fx.usize("vision_hidden"),
        grid: Some((g, g)),
    };
    let llm = llm(fx.usize("hidden_size"), 4 * fx.usize("hidden_size"), 1e-6);
    check(
        "idefics3",
        spec,
        f,
        &llm,
        |c| {
            let Connector::PixelShuffle(p) = c else {
                panic!("not a pixel shuffle")
            };
            vec![(
                "modality_projection.proj.weight",
                p.modality_projection.proj.weight.clone(),
                true,
            )]
        },
        |_| vec![],
    );
}

#[test]
fn blip2_qformer_matches_transformers() {
    let fx = load("blip2_qformer");
    let spec: ConnectorSpec = serde_json::from_value(serde_json::json!({
        "kind": "qformer", "queries": fx.usize("queries"), "hidden": fx.usize("hidden"),
        "layers": fx.usize("layers"), "heads": fx.usize("heads"), "intermediate": fx.usize("intermediate"),
        "cross_attention_frequency": fx.usize("cross_attention_frequency"),
        "layer_norm_eps": fx.config["layer_norm_eps"].as_f64().unwrap(),
    }))
    .unwrap();
    let f = Features {
        tokens: fx.store.shape("input").unwrap()[1],
        width: fx.usize("vision_hidden"),
        grid: None,
    };
    let llm = llm(fx.usize("hidden_size"), 4 * fx.usize("hidden_size"), 1e-6);
    check(
        "blip2_qformer",
        spec,
        f,
        &llm,
        |c| {
            let Connector::Qformer(q) = c else {
                panic!("not a qformer")
            };
            let l2 = &q.qformer.encoder.layer[2];
            vec![
                (
                    "language_projection.weight",
                    q.language_projection.weight.clone(),
                    true,
                ),
                (
                    "qformer.encoder.layer.2.crossattention.attention.key.weight",
                    l2.crossattention
                        .as_ref()
                        .unwrap()
                        .attention
                        .key
                        .weight
                        .clone(),
                    true,
                ),
                (
                    "qformer.encoder.layer.0.intermediate_query.dense.weight",
                    q.qformer.encoder.layer[0]
                        .intermediate_query
                        .dense
                        .weight
                        .clone(),
                    true,
                ),
            ]
        },
        |c| {
            let Connector::Qformer(q) = c else {
                panic!("not a qformer")
            };
            vec![(
                "qformer.layernorm.weight",
                q.qformer.layernorm.as_ref().unwrap().gamma.clone(),
            )]
        },
    );
    // the query embeddings [1, q, h] are a 3-D parameter: checked on their own
    let device = Device::flex().autodiff();
    let identity: &dyn Fn(&str) -> Vec<String> = &|p| vec![p.to_string()];
    let spec: ConnectorSpec = serde_json::from_value(serde_json::json!({
        "kind": "qformer", "queries": 6, "hidden": 32, "layers": 3, "heads": 4, "intermediate": 48,
        "cross_attention_frequency": 2, "layer_norm_eps": 1e-12,
    }))
    .unwrap();
    let c = Loader::new(&fx.store, identity, &[], &device)
        .load_part(spec.init(&f, &llm, false, &device))
        .unwrap();
    let out = c.forward(fx.tensor("input", &device));
    let g = (out * fx.tensor::<3>("probe", &device)).sum().backward();
    let Connector::Qformer(q) = &c else { panic!() };
    let got = to_vec(q.query_tokens.val().grad(&g).unwrap());
    let want = fx.store.get("grad.query_tokens").unwrap().values;
    let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
    let rel = max_abs_diff(&got, &want) / scale;
    eprintln!("blip2_qformer: grad query_tokens rel err {rel:.2e}");
    assert!(rel <= 1e-3, "query_tokens gradient: relative error {rel}");
}

/// Average pooling of a 4×4 grid to 2×2 by hand: each output token is the mean of its 2×2 block (before the
/// MLP, checked through an identity first layer); bilinear to 2×2 at align_corners=False samples the block
/// centres, which for a 2× reduction is the same mean.
#[test]
fn pool_averages_blocks_of_the_patch_grid() {
    let device = Device::flex();
    let f = Features {
        tokens: 16,
        width: 1,
        grid: Some((4, 4)),
    };
    let llm = llm(1, 4, 1e-6);
    let x = float_tensor((0..16).map(|i| i as f32).collect(), [1, 16, 1], &device);
    // block (0,0) holds 0,1,4,5 -> 2.5; (0,1): 2,3,6,7 -> 4.5; (1,0): 10.5; (1,1): 12.5
    for mode in ["avg", "bilinear"] {
        let spec: ConnectorSpec = serde_json::from_value(
            serde_json::json!({"kind": "pool", "grid": 2, "mode": mode, "depth": 1}),
        )
        .unwrap();
        let Connector::Pool(mut p) = spec.init(&f, &llm, false, &device) else {
            panic!("not a pool")
        };
        p.layers[0].weight = Param::from_tensor(float_tensor(vec![1.0], [1, 1], &device));
        let got = to_vec(p.forward(x.clone()));
        assert_eq!(got, vec![2.5, 4.5, 10.5, 12.5], "{mode}");
    }
}

/// Every connector kind inside a tiny LLaVA: the config's image-token count is the connector's, the model saves
/// (mitune layout: `mitune_connector` in config.json) and reloads with equal logits on an image+text prompt.
#[test]
fn every_kind_saves_and_reloads_with_equal_logits() {
    use mitune::checkpoint::{load_llava, save_llava};
    use mitune::zoo::encoders::{EncoderFamily, FeatureSelect};
    use mitune::zoo::mllm::{LlavaSpec, MmInput};
    let device = Device::flex();
    let kinds = [
        serde_json::json!({"kind": "mlp", "depth": 2}),
        serde_json::json!({"kind": "pixel_shuffle", "scale": 2}),
        serde_json::json!({"kind": "pool", "grid": 1, "mode": "bilinear"}),
        serde_json::json!({"kind": "resampler", "latents": 3, "depth": 1, "heads": 4, "kv_heads": 2}),
        serde_json::json!({"kind": "qformer", "queries": 5, "layers": 2, "heads": 4}),
    ];
    let expect_tokens = [16, 4, 1, 3, 5];
    // 32 px, 8 px patches: a 4×4 grid after the CLS token is dropped
    for family in [EncoderFamily::ClipVit, EncoderFamily::Dinov2] {
        let vision = presets::vision("bench-tiny", family).unwrap();
        for (kind, want) in kinds.iter().zip(expect_tokens) {
            let spec = LlavaSpec {
                vision: vision.clone(),
                select: FeatureSelect {
                    layers: vec![-2],
                    drop_cls: true,
                    post_norm: false,
                },
                connector: serde_json::from_value(kind.clone()).unwrap(),
                projector_bias: true,
                llm: presets::llm("bench-tiny", LlmFamily::Llama, 64).unwrap(),
                image_token_id: 63,
                anyres: None,
                native: None,
            };
            spec.validate().unwrap();
            assert_eq!(spec.image_tokens(), want, "{kind}");
            let model = spec.init(&device);
            let dir = std::env::temp_dir().join(format!(
                "mitune-connector-{family:?}-{}-{}",
                spec.connector.kind(),
                std::process::id()
            ));
            save_llava(&model, &dir, safetensors::Dtype::F32, None).unwrap();
            let back = load_llava(&dir, &device).unwrap();
            assert_eq!(back.spec.connector, spec.connector);
            let mut ids = vec![1i64, 5, 6];
            ids.extend(std::iter::repeat_n(63, want));
            ids.extend([7, 8]);
            let px =
                Tensor::<4>::random([1, 3, 32, 32], burn::tensor::Distribution::Default, &device);
            let a = to_vec(
                model
                    .forward(&MmInput::single(ids.clone(), Some(px.clone())))
                    .unwrap(),
            );
            let b = to_vec(back.forward(&MmInput::single(ids, Some(px))).unwrap());
            assert_eq!(max_abs_diff(&a, &b), 0.0, "{kind}: logits after reload");
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}

fn pipeline_recipe(w: &std::path::Path, out: &std::path::Path, connector: &str) -> String {
    let p = |f: &str| format!("{:?}", w.join(f).display().to_string());
    format!(
        r#"name = "zoo"
seed = 7
pipeline = ["align", "instruct", "dpo"]
output = {out:?}

[model.encoder]
kind = "clip_vit"
preset = "bench-tiny"
feature_layer = -1

[model.connector]
{connector}

[model.llm]
kind = "llama"
preset = "bench-tiny"
tokenizer = {tok}

[stages.align]
kind = "align"
data = {{ sources = [{{ kind = "llava_json", path = {cap} }}] }}
template = "plain"
batch = {{ global = 8, micro = 4 }}
optim = {{ kind = "adamw", lr = 3e-3 }}
max_steps = 2
max_len = 64
log_every = 1

[stages.instruct]
kind = "instruct"
data = {{ sources = [{{ kind = "llava_json", path = {inst} }}] }}
template = "vicuna_v1"
batch = {{ global = 8, micro = 4 }}
optim = {{ kind = "adamw", lr = 1e-2 }}
adapter = {{ kind = "lora", rank = 4, alpha = 8, targets = ["q_proj", "v_proj"] }}
max_steps = 4
max_len = 384
log_every = 1
save_every = 2

[stages.dpo]
kind = "dpo"
data = {{ sources = [{{ format = "pairs", path = {pref}, cap = 16 }}] }}
template = "vicuna_v1"
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 256
log_every = 1
"#,
        out = out.display().to_string(),
        tok = p("tokenizer"),
        cap = p("captions_train.json"),
        inst = p("instruct_train.json"),
        pref = p("preference_train.jsonl"),
    )
}

/// Each new connector trains under align (connector alone), instruct with LoRA on the LLM (connector fully
/// trained) and DPO, on the tiny shapes world; a run killed in the middle of instruct resumes to the same losses
/// as an uninterrupted one, and every stage's model reloads with its connector.
#[test]
fn new_connectors_train_every_stage_and_resume_exactly() {
    let d = common::scratch("connector-pipeline");
    let w = common::world(&d);
    let kinds = [
        ("pixel_shuffle", "kind = \"pixel_shuffle\"\nscale = 2", 4),
        (
            "pool",
            "kind = \"pool\"\nfactor = 2\nmode = \"bilinear\"",
            4,
        ),
        (
            "resampler",
            "kind = \"resampler\"\nlatents = 3\ndepth = 1\nheads = 4\nkv_heads = 2",
            3,
        ),
    ];
    for (kind, table, tokens) in kinds {
        let a = d.join(format!("{kind}-a.toml"));
        let b = d.join(format!("{kind}-b.toml"));
        std::fs::write(&a, pipeline_recipe(&w, &d.join(format!("{kind}-a")), table)).unwrap();
        std::fs::write(&b, pipeline_recipe(&w, &d.join(format!("{kind}-b")), table)).unwrap();
        let (ok, err) = common::run_mitune(&["train", a.to_str().unwrap()], None);
        assert!(ok, "{kind}: {err}");
        let (ok, _) = common::run_mitune(
            &["train", b.to_str().unwrap()],
            Some(("MITUNE_FAULT_ABORT_AT_STEP", "instruct:3")),
        );
        assert!(!ok, "{kind}: the fault should have killed the run");
        let (ok, err) = common::run_mitune(&["train", b.to_str().unwrap(), "--resume"], None);
        assert!(ok, "{kind}: {err}");
        let (la, lb) = (
            common::losses(&d.join(format!("{kind}-a/zoo"))),
            common::losses(&d.join(format!("{kind}-b/zoo"))),
        );
        assert_eq!(la.len(), 2 + 4 + 2, "{kind}: {la:?}");
        assert_eq!(
            la, lb,
            "{kind}: resumed losses differ from the uninterrupted run"
        );
        for stage in ["align", "instruct", "dpo"] {
            let dir = d.join(format!("{kind}-a/zoo/{stage}/model"));
            let spec = mitune::checkpoint::hf::llava_spec(&dir).unwrap();
            assert_eq!(spec.connector.kind(), kind, "{stage}");
            assert_eq!(spec.image_tokens(), tokens, "{kind} {stage}");
            mitune::checkpoint::load_llava(&dir, &Device::flex()).unwrap();
        }
    }
}

/// InstructBLIP's instruction-aware Q-Former: the instruction's tokens join the queries (the second image's
/// instruction is shorter: padded and masked); features and gradients against transformers.
#[test]
fn instructblip_qformer_reads_the_instruction_as_transformers() {
    let fx = load("instructblip_qformer");
    let spec: ConnectorSpec = serde_json::from_value(serde_json::json!({
        "kind": "qformer", "queries": fx.usize("queries"), "hidden": fx.usize("hidden"),
        "layers": fx.usize("layers"), "heads": fx.usize("heads"), "intermediate": fx.usize("intermediate"),
        "cross_attention_frequency": fx.usize("cross_attention_frequency"),
        "layer_norm_eps": 1e-12,
        "instruction": {"vocab_size": fx.usize("vocab_size"),
                        "max_position_embeddings": fx.usize("max_position_embeddings"), "pad_token_id": 0},
    }))
    .unwrap();
    let ins: Vec<Vec<i64>> = serde_json::from_value(fx.config["instructions"].clone()).unwrap();
    let f = Features {
        tokens: fx.store.shape("input").unwrap()[1],
        width: fx.usize("vision_hidden"),
        grid: None,
    };
    let llm = llm(fx.usize("hidden_size"), 4 * fx.usize("hidden_size"), 1e-6);
    let device = Device::flex().autodiff();
    let identity: &dyn Fn(&str) -> Vec<String> = &|p| vec![p.to_string()];
    let c = Loader::new(&fx.store, identity, &[], &device)
        .load_part(spec.init(&f, &llm, false, &device))
        .unwrap();
    let out = c.forward_with(fx.tensor("input", &device), Some(&ins));
    let want = fx.store.get("output").unwrap().values;
    let err = max_abs_diff(&to_vec(out.clone()), &want);
    eprintln!("instructblip_qformer: features max abs err {err:.2e}");
    assert!(err <= 1e-4, "features differ by {err}");
    // without the instruction the features change: the text really enters the queries' attention
    let blind = to_vec(c.forward(fx.tensor("input", &device)));
    assert!(max_abs_diff(&blind, &want) > 1e-3);
    let g = (out * fx.tensor::<3>("probe", &device)).sum().backward();
    let Connector::Qformer(q) = &c else { panic!() };
    let checks: Vec<(&str, Vec<f32>)> = vec![
        (
            "qformer.embeddings.word_embeddings.weight",
            to_vec(
                q.qformer
                    .embeddings
                    .as_ref()
                    .unwrap()
                    .word_embeddings
                    .weight
                    .val()
                    .grad(&g)
                    .unwrap(),
            ),
        ),
        (
            "qformer.encoder.layer.0.intermediate.dense.weight",
            to_vec(
                q.qformer.encoder.layer[0]
                    .intermediate
                    .as_ref()
                    .unwrap()
                    .dense
                    .weight
                    .val()
                    .grad(&g)
                    .unwrap()
                    .transpose(),
            ),
        ),
        (
            "query_tokens",
            to_vec(q.query_tokens.val().grad(&g).unwrap()),
        ),
    ];
    for (key, got) in checks {
        let want = fx.store.get(&format!("grad.{key}")).unwrap().values;
        let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        let rel = max_abs_diff(&got, &want) / scale;
        eprintln!("instructblip_qformer: grad {key} rel err {rel:.2e}");
        assert!(rel <= 1e-3, "gradient of {key}: relative error {rel}");
    }
}

/// Connector settings the encoder's features cannot take are located errors from `mitune validate`, before any
/// tensor is made: a pool grid larger than the patch grid, a Q-Former without queries, pixel shuffle over a CLS token.
#[test]
fn impossible_connectors_are_located_errors_before_compute() {
    let d = common::scratch("connector-errors");
    let w = common::world(&d);
    let r = d.join("r.toml");
    for (table, want) in [
        (
            "kind = \"pool\"\ngrid = 5",
            "grid = 5 is larger than the encoder's 4×4 patch grid",
        ),
        (
            "kind = \"qformer\"\nqueries = 0",
            "queries must be at least 1",
        ),
        (
            "kind = \"pixel_shuffle\"\nscale = 3",
            "not square and divisible by scale = 3",
        ),
    ] {
        std::fs::write(&r, pipeline_recipe(&w, &d.join("runs"), table)).unwrap();
        let (ok, err) = common::run_mitune(&["validate", r.to_str().unwrap()], None);
        assert!(!ok, "{table}: should fail");
        assert!(
            err.contains("model.connector") && err.contains(want),
            "{table}: {err}"
        );
    }
}
