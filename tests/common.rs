//! Shared helpers for the parity tests: fixture paths, expected tensors/JSON, comparisons.
#![allow(dead_code)]
use burn::tensor::{Device, Tensor};
use mitune::checkpoint::safetensors_io::WeightStore;
use mitune::zoo::layers::{float_tensor, to_vec};
use mitune::zoo::mllm::{Llava, MmInput};
use std::path::PathBuf;

pub const MODELS: [&str; 2] = ["llava_clip_llama", "llava_siglip_qwen2"];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn image(name: &str) -> PathBuf {
    fixture("images").join(name)
}

pub struct Expected {
    pub store: WeightStore,
    pub meta: serde_json::Value,
}

pub fn expected(name: &str) -> Expected {
    expected_file(name, "expected")
}

/// A fixture's `STEM.json` + `STEM.safetensors` (a script's later cases kept beside `expected.*`).
pub fn expected_file(name: &str, stem: &str) -> Expected {
    let d = fixture(name);
    let store = WeightStore::open_files(&[d.join(format!("{stem}.safetensors"))]).unwrap();
    let meta =
        serde_json::from_str(&std::fs::read_to_string(d.join(format!("{stem}.json"))).unwrap())
            .unwrap();
    Expected { store, meta }
}

impl Expected {
    pub fn tensor(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let l = self.store.get(key).unwrap();
        (l.shape, l.values)
    }
    pub fn ids(&self, case: &str) -> Vec<i64> {
        self.meta[case]["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// An expected [n, c, h, w] pixel tensor (transformers' processor output) on `device`.
pub fn pixels(e: &Expected, key: &str, device: &Device) -> Tensor<4> {
    let (s, v) = e.tensor(key);
    float_tensor(v, [s[0], s[1], s[2], s[3]], device)
}

/// Logits a fixture stores (tools/make_fixtures.py): each row's last `LOGIT_TAIL` positions.
pub const LOGIT_TAIL: usize = 16;

/// [b, t, v] logits -> each row's last `keep` positions, [b, keep, v].
pub fn logit_tail(logits: &[f32], b: usize, vocab: usize, keep: usize) -> Vec<f32> {
    let t = logits.len() / (b * vocab);
    (0..b)
        .flat_map(|r| {
            logits[(r * t + t - keep) * vocab..(r + 1) * t * vocab]
                .iter()
                .copied()
        })
        .collect()
}

/// Max |Δlogit| of `model` vs transformers on the fixture's image+text prompt (its stored last positions).
pub fn image_text_logit_error(model: &Llava, e: &Expected, device: &Device) -> f32 {
    let px = pixels(e, "image_text.pixel_values", device);
    let out = model
        .forward(&MmInput::single(e.ids("image_text"), Some(px)))
        .unwrap();
    let vocab = out.dims()[2];
    let got = logit_tail(&to_vec(out), 1, vocab, LOGIT_TAIL);
    max_abs_diff(&got, &e.tensor("image_text.logits").1)
}

/// A fresh scratch directory for one test (`tag` keeps parallel tests apart).
pub fn scratch(tag: &str) -> PathBuf {
    // an earlier run's folder of this tag (kept for a look after it, whether it passed or not) goes now, so they
    // do not pile up in the temp dir: one per tag at most
    let stale = format!("mitune-{tag}-");
    for e in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if name
            .strip_prefix(&stale)
            .is_some_and(|pid| pid.parse::<u32>().is_ok_and(|p| p != std::process::id()))
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let d = std::env::temp_dir().join(format!("mitune-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny shapes world (48 training images) under `dir/shapes`.
pub fn world(dir: &std::path::Path) -> PathBuf {
    let w = dir.join("shapes");
    let cfg = mitune::data::shapes::ShapesConfig {
        seed: 1,
        train: 48,
        heldout: 6,
        vocab_size: 320,
    };
    mitune::data::shapes::ensure(&w, &cfg).unwrap();
    w
}

/// Runs the mitune binary; (success, stderr).
pub fn run_mitune(args: &[&str], env: Option<(&str, &str)>) -> (bool, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"));
    c.args(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A Qwen2-VL fixture's still-image patches, stored as their first frame [N, 3, p, p] -> the model's
/// [N, 3·2, p, p] (channel c·2 + frame; a still image's two temporal frames are equal).
pub fn qwen_still_patches(e: &Expected, key: &str, device: &Device) -> Tensor<4> {
    let (s, v) = e.tensor(key);
    let (n, p) = (s[0], s[2]);
    let mut out = Vec::with_capacity(v.len() * 2);
    for i in 0..n {
        for c in 0..3 {
            let plane = &v[(i * 3 + c) * p * p..(i * 3 + c + 1) * p * p];
            out.extend_from_slice(plane);
            out.extend_from_slice(plane);
        }
    }
    float_tensor(out, [n, 6, p, p], device)
}

/// A Qwen2-VL model's loss and its gradients against a fixture: (loss, rel. error of the merger's first linear
/// [first 32 rows, as `loss.grad_merger_mlp0_weight`], rel. error of the patch embedding [first `rows` rows of
/// `loss.grad_patch_embed`]). `logits` [1, t, v] from `model` on an autodiff device.
pub fn qwen_loss_and_grads(
    model: &Llava,
    logits: Tensor<3>,
    labels: &[i64],
    e: &Expected,
    rows: usize,
) -> (f32, f32, f32) {
    let loss = masked_loss(logits, labels);
    let got = to_vec(loss.clone())[0];
    let grads = loss.backward();
    let rel = |g: Vec<f32>, key: &str| rel_err(&g, &e.tensor(key).1);
    let mitune::zoo::connectors::Connector::Merger(mg) = &model.multi_modal_projector else {
        panic!("the connector is the merger")
    };
    let g = to_vec(mg.fc1.weight.val().grad(&grads).unwrap().transpose());
    let g1 = rel(g[..32 * 128].to_vec(), "loss.grad_merger_mlp0_weight");
    let mitune::zoo::encoders::Encoder::Qwen2Vit(vit) = &model.vision_tower else {
        panic!("the encoder is Qwen2-VL's")
    };
    let pg = to_vec(vit.patch_embed.proj.weight.val().grad(&grads).unwrap());
    let per = pg.len() / vit.patch_embed.proj.weight.dims()[0];
    let g2 = rel(pg[..rows * per].to_vec(), "loss.grad_patch_embed");
    (got, g1, g2)
}

/// `mitune validate RECIPE --data` must succeed: its (stdout, stderr).
pub fn validate_data(recipe: &std::path::Path) -> (String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"))
        .args(["validate", recipe.to_str().unwrap(), "--data"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

/// (stage, step) -> loss as written in a run's metrics.jsonl (the last line wins: a resumed step overwrites the
/// killed run's).
pub fn losses(run: &std::path::Path) -> Vec<((String, u64), String)> {
    let mut m = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let (Some(s), Some(k), Some(l)) =
            (v["stage"].as_str(), v["step"].as_u64(), v.get("loss"))
        {
            m.insert((s.to_string(), k), l.to_string());
        }
    }
    m.into_iter().collect()
}

/// transformers' causal-LM loss with `labels` (-100 = not scored): mean over scored positions of
/// -log p(label[i+1] | ..i). logits: [1, t, vocab].
pub fn masked_loss(logits: Tensor<3>, labels: &[i64]) -> Tensor<1> {
    use mitune::zoo::layers::int_tensor;
    let device = logits.device();
    let [b, t, v] = logits.dims();
    let logp = burn::tensor::activation::log_softmax(logits.slice([0..b, 0..t - 1, 0..v]), 2);
    let targets: Vec<i64> = labels[1..].iter().map(|&l| l.max(0)).collect();
    let weights: Vec<f32> = labels[1..]
        .iter()
        .map(|&l| if l >= 0 { 1.0 } else { 0.0 })
        .collect();
    let n: f32 = weights.iter().sum();
    let picked = logp
        .gather(2, int_tensor(targets, [1, t - 1, 1], &device))
        .reshape([1, t - 1]);
    (picked * float_tensor(weights, [1, t - 1], &device))
        .sum()
        .neg()
        / n
}

/// Max |got − want| relative to want's largest magnitude (how gradients are compared).
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
    max_abs_diff(got, want) / scale
}

/// Trains `recipe(out)` twice under `dir` — once straight (`runs-a`), once killed at `stage` step 3 and resumed
/// (`runs-b`) — and returns both runs' logged losses (run `name`).
pub fn train_kill_resume(
    dir: &std::path::Path,
    name: &str,
    stage: &str,
    recipe: impl Fn(&str) -> String,
) -> (Vec<((String, u64), String)>, Vec<((String, u64), String)>) {
    let (a, b) = (dir.join("a.toml"), dir.join("b.toml"));
    std::fs::write(&a, recipe("runs-a")).unwrap();
    std::fs::write(&b, recipe("runs-b")).unwrap();
    let (ok, err) = run_mitune(&["train", a.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let fault = format!("{stage}:3");
    let (ok, _) = run_mitune(
        &["train", b.to_str().unwrap()],
        Some(("MITUNE_FAULT_ABORT_AT_STEP", fault.as_str())),
    );
    assert!(!ok, "the fault did not stop the run");
    let (ok, err) = run_mitune(&["train", b.to_str().unwrap(), "--resume"], None);
    assert!(ok, "{err}");
    (
        losses(&dir.join("runs-a").join(name)),
        losses(&dir.join("runs-b").join(name)),
    )
}

/// A DPO → GRPO → eval pipeline over a model directory on the shapes `world` (2 steps each), for the
/// model families' stage tests. `model`: the lines of the `[model]` table; `template`: the stages' template.
pub fn pref_rl_eval_recipe(
    name: &str,
    out: &std::path::Path,
    model: &str,
    template: &str,
    world: &std::path::Path,
) -> String {
    let p = |f: &str| world.join(f).display().to_string();
    format!(
        r#"name = "{name}"
seed = 1
pipeline = ["dpo", "grpo", "after"]
output = {out:?}
[model]
{model}
[stages.dpo]
kind = "dpo"
template = "{template}"
data = {{ sources = [{{ format = "pairs", path = {pairs:?} }}] }}
loss = {{ kind = "sigmoid", beta = 1.0 }}
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 256
log_every = 1
[stages.grpo]
kind = "grpo"
init = {{ from_stage = "dpo" }}
template = "{template}"
data = {{ sources = [{{ path = {prompts:?} }}] }}
group = 2
rewards = [{{ kind = "exact_match" }}]
sampling = {{ temperature = 1.0, max_new_tokens = 4 }}
batch = {{ global = 2, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-4 }}
max_steps = 2
max_len = 256
log_every = 1
[stages.after]
kind = "eval"
init = {{ from_stage = "grpo" }}
tasks = [{{ task = "vqa", data = {vqa:?}, limit = 4 }}, {{ task = "pope", data = {pope:?}, hint = "Answer yes or no.", limit = 4 }}]
"#,
        out = out.display().to_string(),
        pairs = p("preference_probes_train.jsonl"),
        prompts = p("prompts_train.jsonl"),
        vqa = p("eval/heldout/vqa.jsonl"),
        pope = p("eval/heldout/pope_popular.json"),
    )
}

/// Max |Δ| between a forward's logits `got` [b, t, v] and a fixture's `want` [b, cols.len(), v] kept at columns
/// `cols` (the fixture stores a few text columns), over the rows' real (attended) positions.
pub fn column_logit_err(
    got: &[f32],
    want: &[f32],
    attention: &[Vec<bool>],
    cols: &[usize],
    v: usize,
) -> f32 {
    let t = attention[0].len();
    let mut err = 0f32;
    for (b, row) in attention.iter().enumerate() {
        for (k, &j) in cols.iter().enumerate() {
            if row[j] {
                let o = (b * t + j) * v;
                let w = (b * cols.len() + k) * v;
                err = err.max(max_abs_diff(&got[o..o + v], &want[w..w + v]));
            }
        }
    }
    err
}

/// A processor's padded `input_ids` row without its padding (`mask` 0).
pub fn unpadded(ids: &serde_json::Value, mask: &serde_json::Value) -> Vec<i64> {
    let ids: Vec<i64> = serde_json::from_value(ids.clone()).unwrap();
    let mask: Vec<i64> = serde_json::from_value(mask.clone()).unwrap();
    ids.into_iter()
        .zip(&mask)
        .filter(|(_, k)| **k == 1)
        .map(|(x, _)| x)
        .collect()
}

/// A 4-step LoRA instruct stage (`lora`) over the model directory `model` on the LLaVA JSON `data`, writing under
/// `out`, checkpointing every 2 steps: the model families' fine-tune-and-resume tests.
pub fn lora_recipe(
    name: &str,
    out: &std::path::Path,
    model: &std::path::Path,
    data: &std::path::Path,
    template: &str,
    max_len: usize,
) -> String {
    format!(
        r#"name = "{name}"
seed = 3
pipeline = ["lora"]
output = {out:?}
[model]
from = {model:?}
[stages.lora]
kind = "instruct"
data = {{ sources = [{{ kind = "llava_json", path = {data:?} }}] }}
template = "{template}"
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
adapter = {{ kind = "lora", rank = 4, alpha = 8, targets = ["q_proj", "v_proj"] }}
train = ["connector"]
max_steps = 4
max_len = {max_len}
log_every = 1
save_every = 2
"#,
        out = out.display().to_string(),
        model = model.display().to_string(),
        data = data.display().to_string(),
    )
}

/// A LLaVA JSON of 10 one-image samples cycling through the fixture photos `names`, written to `dir/mixed.json`.
pub fn mixed_size_data(dir: &std::path::Path, names: &[&str]) -> PathBuf {
    let records: Vec<serde_json::Value> = (0..10)
        .map(|i| {
            serde_json::json!({
                "id": format!("s{i}"),
                "image": image(names[i % names.len()]).display().to_string(),
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the picture?"},
                    {"from": "gpt", "value": format!("Picture number {i}.")},
                ],
            })
        })
        .collect();
    let data = dir.join("mixed.json");
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    data
}

/// `mitune ARGS... --json` must succeed; its JSON line (`input_ids`, `output_ids`, `text`, `logprobs`).
pub fn cli_json(args: &[&str]) -> serde_json::Value {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap()
}

/// The tiny two-stage pipeline the crash, data-parallel and GPU tests train: align (4 steps) → instruct (6 steps)
/// on bench-tiny presets over the shapes world `w`, 2 micro-batches per step, a checkpoint every step (the last 2
/// kept), run `name` under `out`; `stages` is the pipeline (align, instruct, then any stage `extra` adds: more
/// TOML tables, e.g. `dpo_table`).
#[allow(dead_code)]
pub fn tiny_pipeline(
    name: &str,
    w: &std::path::Path,
    out: &std::path::Path,
    stages: &[&str],
    extra: &str,
) -> String {
    let p = |f: &str| format!("{:?}", w.join(f).display().to_string());
    format!(
        r#"name = "{name}"
seed = 5
pipeline = {stages:?}
output = {out:?}

[model.encoder]
kind = "clip_vit"
preset = "bench-tiny"

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
max_steps = 4
max_len = 64
log_every = 1
save_every = 1

[stages.instruct]
kind = "instruct"
data = {{ sources = [{{ kind = "llava_json", path = {inst} }}] }}
template = "vicuna_v1"
batch = {{ global = 8, micro = 4 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 6
max_len = 384
log_every = 1
save_every = 1
keep_last = 2
{extra}"#,
        out = out.display().to_string(),
        tok = p("tokenizer"),
        cap = p("captions_train.json"),
        inst = p("instruct_train.json"),
    )
}

/// A `dpo` stage for `tiny_pipeline`: 2 steps of 4 pairs from the shapes world `w`, 2 micro-batches.
#[allow(dead_code)]
pub fn dpo_table(w: &std::path::Path) -> String {
    format!(
        r#"
[stages.dpo]
kind = "dpo"
template = "vicuna_v1"
data = {{ sources = [{{ format = "pairs", path = {pairs:?} }}] }}
loss = {{ kind = "sigmoid", beta = 1.0 }}
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 384
log_every = 1
"#,
        pairs = w
            .join("preference_probes_train.jsonl")
            .display()
            .to_string()
    )
}
