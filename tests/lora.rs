//! LoRA fine-tuning: adapters start at the base (B = 0), train alone (bases bit-identical), save in PEFT's layout,
//! merge to the same logits, resume exactly after a kill, and bad targets / mismatched adapters are clear errors.
mod common;

use burn::tensor::Device;
use common::{losses, max_abs_diff, run_mitune, scratch, world};
use mitune::checkpoint::safetensors_io::WeightStore;
use mitune::checkpoint::{load_llava, peft};
use mitune::recipe::schema::{Adapter, AdapterKind};
use mitune::zoo::layers::to_vec;
use mitune::zoo::lora;
use mitune::zoo::mllm::{Llava, MmInput};
use std::path::Path;

/// align (connector, 2 steps) → instruct with LoRA on the LLM's q/v projections + the connector in full.
fn recipe(w: &Path, out: &Path, targets: &str) -> String {
    let p = |f: &str| format!("{:?}", w.join(f).display().to_string());
    format!(
        r#"name = "lora"
seed = 5
pipeline = ["align", "instruct"]
output = {out:?}

[model.encoder]
kind = "clip_vit"
preset = "bench-tiny"
feature_layer = -1

[model.llm]
kind = "llama"
preset = "bench-tiny"
tokenizer = {tok}

[stages.align]
kind = "align"
data = {{ sources = [{{ kind = "llava_json", path = {cap} }}] }}
template = "plain"
batch = {{ global = 8, micro = 8 }}
optim = {{ kind = "adamw", lr = 3e-3 }}
max_steps = 2
max_len = 64

[stages.instruct]
kind = "instruct"
data = {{ sources = [{{ kind = "llava_json", path = {inst} }}] }}
template = "vicuna_v1"
batch = {{ global = 8, micro = 4 }}
optim = {{ kind = "adamw", lr = 1e-2 }}
adapter = {{ kind = "lora", rank = 4, alpha = 8, targets = {targets} }}
max_steps = 6
max_len = 384
log_every = 1
save_every = 2
"#,
        out = out.display().to_string(),
        tok = p("tokenizer"),
        cap = p("captions_train.json"),
        inst = p("instruct_train.json"),
    )
}

fn logits(m: &Llava) -> Vec<f32> {
    let ids: Vec<i64> = (10..40).collect();
    to_vec(m.forward(&MmInput::single(ids, None)).unwrap())
}

fn tensors(dir: &Path) -> WeightStore {
    WeightStore::open_dir(dir).unwrap()
}

#[test]
fn adapted_model_starts_equal_to_its_base() {
    let device = Device::flex();
    let d = scratch("lora-init");
    let w = world(&d);
    let r = d.join("r.toml");
    std::fs::write(&r, recipe(&w, &d.join("runs"), r#"["q_proj", "v_proj"]"#)).unwrap();
    let (rc, _) = mitune::recipe::load(&r, &[]).unwrap();
    let base = mitune::model::build(&rc.model, false, &device)
        .unwrap()
        .model;
    let f = Adapter::lora(4, 8.0, &["q_proj", "v_proj"], &["llm"]);
    let lin = lora::resolve(&base, &f, "adapter").unwrap();
    // bench-tiny LLaMA: 2 layers × (q, v); the encoder's q/v projections are not in `parts`.
    assert_eq!(lin.len(), 4, "{lin:?}");
    assert!(
        lin[0]
            .module
            .starts_with("model.language_model.layers.0.self_attn.")
    );
    let adapted = lora::attach(base.clone(), &f, &lin, &device).unwrap();
    assert_eq!(lora::factors(&adapted).len(), 8);
    let (a, b) = (logits(&base), logits(&adapted));
    assert_eq!(a, b, "B = 0: the adapted model must equal its base exactly");
    // A target that matches nothing names what exists.
    let f = Adapter {
        targets: vec!["qkv".into()],
        ..f
    };
    let e = lora::resolve(&base, &f, "stages.x.adapter")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("stages.x.adapter.targets") && e.contains("\"qkv\"") && e.contains("q_proj"),
        "{e}"
    );
}

#[test]
fn lora_stage_saves_peft_merges_and_resumes_exactly() {
    let device = Device::flex();
    let d = scratch("lora-run");
    let w = world(&d);
    let (a, b) = (d.join("a.toml"), d.join("b.toml"));
    let t = r#"["q_proj", "re:model\\.language_model\\.layers\\.1\\.mlp\\.down_proj"]"#;
    std::fs::write(&a, recipe(&w, &d.join("runs-a"), t)).unwrap();
    std::fs::write(&b, recipe(&w, &d.join("runs-b"), t)).unwrap();
    let (ok, err) = run_mitune(&["train", a.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert!(err.contains("training connector"), "{err}");
    let run = d.join("runs-a/lora");
    let st = run.join("instruct");

    // PEFT layout: LLaVA (transformers 5) module names, lora_A [r, in], lora_B [out, r], connector in full.
    let cfg = peft::read_config(&st.join("adapter")).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
    assert_eq!(
        cfg.modules_to_save.as_deref(),
        Some(&["multi_modal_projector".to_string()][..])
    );
    let ad = WeightStore::open_files(&[st.join("adapter").join(peft::WEIGHTS)]).unwrap();
    let mut keys: Vec<&str> = ad.keys().collect();
    keys.sort();
    let pre = "base_model.model.model.";
    assert!(keys.contains(&&*format!(
        "{pre}language_model.layers.0.self_attn.q_proj.lora_A.weight"
    )));
    assert!(keys.contains(&&*format!(
        "{pre}language_model.layers.1.mlp.down_proj.lora_B.weight"
    )));
    assert!(
        !keys.iter().any(|k| k.contains("layers.0.mlp.down_proj")),
        "{keys:?}"
    );
    assert!(keys.contains(&&*format!("{pre}multi_modal_projector.linear_1.weight")));
    assert_eq!(keys.len(), 3 * 2 + 4, "{keys:?}");
    let q = format!("{pre}language_model.layers.0.self_attn.q_proj.lora_");
    let (qa, qb) = (
        ad.shape(&format!("{q}A.weight")).unwrap(),
        ad.shape(&format!("{q}B.weight")).unwrap(),
    );
    assert_eq!((qa[0], qb[1]), (4, 4), "A is [r, in], B is [out, r]");
    let bq = ad.get(&format!("{q}B.weight")).unwrap().values;
    assert!(
        bq.iter().any(|v| *v != 0.0),
        "B should have trained away from 0"
    );

    // The bases did not move: every LLM tensor of base/ equals the align stage's model bit for bit.
    let (before, after) = (tensors(&run.join("align/model")), tensors(&st.join("base")));
    let mut llm = 0;
    for k in before.keys().filter(|k| k.starts_with("language_model.")) {
        assert_eq!(
            before.get(k).unwrap().values,
            after.get(k).unwrap().values,
            "{k} moved"
        );
        llm += 1;
    }
    assert!(llm > 10);

    // Merged (model/ and export --merge-lora) = base + adapter unmerged, within 1e-4.
    let unmerged = peft::load_adapted(&st.join("base"), &st.join("adapter"), &device).unwrap();
    let merged = load_llava(&st.join("model"), &device).unwrap();
    let base = load_llava(&st.join("base"), &device).unwrap();
    let (u, m) = (logits(&unmerged), logits(&merged));
    let err = max_abs_diff(&u, &m);
    assert!(err < 1e-4, "merged vs unmerged: {err}");
    assert!(
        max_abs_diff(&u, &logits(&base)) > 1e-3,
        "the adapter should change the logits"
    );
    let out = d.join("merged");
    let (ok, e) = run_mitune(
        &[
            "export",
            st.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--merge-lora",
        ],
        None,
    );
    assert!(ok, "{e}");
    assert!(max_abs_diff(&u, &logits(&load_llava(&out, &device).unwrap())) < 1e-4);
    let out2 = d.join("unmerged");
    let (ok, e) = run_mitune(
        &[
            "export",
            st.to_str().unwrap(),
            "--out",
            out2.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{e}");
    let cfg2 = peft::read_config(&out2.join("adapter")).unwrap();
    assert!(cfg2.base_model_name_or_path.unwrap().ends_with("unmerged"));
    assert!(out2.join("config.json").exists() && out2.join("tokenizer.json").exists());

    // Killed after instruct step 5 (last checkpoint: step 4, base + adapter), resumed: the same losses.
    let (ok, _) = run_mitune(
        &["train", b.to_str().unwrap()],
        Some(("MITUNE_FAULT_ABORT_AT_STEP", "instruct:5")),
    );
    assert!(!ok, "the fault should have killed the run");
    let (ok, err) = run_mitune(&["train", b.to_str().unwrap(), "--resume"], None);
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 4/6"), "{err}");
    let (la, lb) = (losses(&run), losses(&d.join("runs-b/lora")));
    assert_eq!(
        la.len(),
        8,
        "align logs its first and last steps, instruct all 6: {la:?}"
    );
    assert_eq!(
        la, lb,
        "resumed LoRA losses differ from the uninterrupted run"
    );

    // An adapter for another rank does not load onto this model: a clear error naming the tensor.
    let f = Adapter::lora(2, 4.0, &["q_proj"], &["llm"]);
    let lin = lora::resolve(&base, &f, "adapter").unwrap();
    let other = lora::attach(base, &f, &lin, &device).unwrap();
    let e = peft::load(other, &st.join("adapter"), &lin, &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_A.weight") && e.contains("another rank"),
        "{e}"
    );

    // A target that matches nothing stops the stage before its first step.
    let c = d.join("c.toml");
    std::fs::write(&c, recipe(&w, &d.join("runs-c"), r#"["qkv_proj"]"#)).unwrap();
    let (ok, err) = run_mitune(&["train", c.to_str().unwrap()], None);
    assert!(
        !ok && err.contains("stages.instruct.adapter.targets") && err.contains("qkv_proj"),
        "{err}"
    );
    // QLoRA: the same stage over an 8-bit base; base/ holds the dequantized base (close to, not equal to, the
    // align model's weights) and the adapter still reproduces the merged model.
    let (ok, err) = run_mitune(
        &[
            "train",
            a.to_str().unwrap(),
            "--set",
            "name=qlora",
            "--set",
            r#"stages.instruct.adapter={ kind = "qlora", rank = 4, alpha = 8, targets = ["q_proj"], bits = 8 }"#,
        ],
        None,
    );
    assert!(ok, "{err}");
    let st = d.join("runs-a/qlora/instruct");
    let k = "language_model.model.layers.0.self_attn.q_proj.weight";
    let (x, y) = (
        tensors(&run.join("align/model")).get(k).unwrap().values,
        tensors(&st.join("base")).get(k).unwrap().values,
    );
    let q_err = max_abs_diff(&x, &y);
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        q_err > 0.0 && q_err <= max / 127.0 * 0.51,
        "8-bit rounding error {q_err} (max |w| {max})"
    );
    let unmerged = peft::load_adapted(&st.join("base"), &st.join("adapter"), &device).unwrap();
    let merged = load_llava(&st.join("model"), &device).unwrap();
    assert!(max_abs_diff(&logits(&unmerged), &logits(&merged)) < 1e-4);
    let q = Adapter {
        kind: AdapterKind::Qlora,
        ..Adapter::lora(4, 8.0, &["q_proj"], &["llm"])
    };
    assert_eq!(q.quant_bits(), Some(8), "QLoRA defaults to 8 bits");
    // Adapter dropout is refused by validation, and so is rank 0.
    let (ok, err) = run_mitune(
        &[
            "validate",
            a.to_str().unwrap(),
            "--set",
            "stages.instruct.adapter.rank=0",
        ],
        None,
    );
    assert!(!ok && err.contains("adapter.rank"), "{err}");
    let (ok, err) = run_mitune(
        &[
            "validate",
            a.to_str().unwrap(),
            "--set",
            "stages.instruct.adapter.dropout=0.05",
        ],
        None,
    );
    assert!(!ok && err.contains("adapter.dropout"), "{err}");
}

/// A stage's own `seed` decides its adapters' initialisation as well as its data order: the same stage seed under
/// two recipe seeds trains to the same losses; another stage seed to other losses.
#[test]
fn a_stage_seed_reaches_the_adapters_initialisation() {
    let d = scratch("stage-seed");
    let data = common::mixed_size_data(&d, &["astronaut_32.png", "coffee_32.png"]);
    let model = common::fixture("llava_clip_llama");
    let run = |top: u64, stage: u64, out: &str| {
        let text = common::lora_recipe("s", &d.join(out), &model, &data, "vicuna_v1", 512)
            .replace("seed = 3\n", &format!("seed = {top}\n"))
            .replace(
                "max_steps = 4\n",
                &format!("max_steps = 3\nseed = {stage}\n"),
            );
        let r = d.join(format!("{out}.toml"));
        std::fs::write(&r, text).unwrap();
        let (ok, err) = run_mitune(&["train", r.to_str().unwrap()], None);
        assert!(ok, "{err}");
        losses(&d.join(out).join("s"))
    };
    let a = run(3, 11, "a");
    let b = run(4, 11, "b");
    let c = run(3, 12, "c");
    assert_eq!(a.len(), 3);
    assert_eq!(
        a, b,
        "the recipe's seed leaked into a stage with its own seed"
    );
    assert_ne!(a, c, "the stage's seed changed nothing");
}
