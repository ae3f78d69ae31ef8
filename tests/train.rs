//! Training on a tiny shapes world (generated into a temp dir): loss masks per template, averaged gradient
//! accumulation, freezing, and a tiny align → instruct pipeline killed mid-stage and resumed exactly.
mod common;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use common::{losses, run_mitune, scratch, world};
use mitune::data::loader::{MicroBatch, micro_batch, micro_batch_rows, pack_rows};
use mitune::data::sources::{Role, Sample};
use mitune::data::templates;
use mitune::model as build;
use mitune::recipe::schema::{OnBad, Template};
use mitune::stages::{params, steps, trainer};
use mitune::zoo::layers::to_vec;
use mitune::zoo::mllm::Llava;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A two-stage recipe on bench-tiny presets over the world `w`, runs written under `out`.
fn recipe(w: &Path, out: &Path) -> String {
    let p = |f: &str| format!("{:?}", w.join(f).display().to_string());
    format!(
        r#"name = "tiny"
seed = 3
pipeline = ["align", "instruct", "bench"]
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
batch = {{ global = 8, micro = 4 }}
optim = {{ kind = "adamw", lr = 3e-3 }}
max_steps = 4
max_len = 64
log_every = 1
save_every = 2

[stages.instruct]
kind = "instruct"
data = {{ sources = [{{ kind = "llava_json", path = {inst} }}, {{ kind = "llava_json", path = {text} }}] }}
template = "vicuna_v1"
batch = {{ global = 8, micro = 4 }}
optim = {{ kind = "adamw", lr = 1e-3, weight_decay = 0.1, part_lr = {{ connector = 2e-3 }} }}
schedule = {{ kind = "warmup_cosine", warmup_steps = 2 }}
max_steps = 6
max_len = 384
log_every = 1
save_every = 2
keep_last = 2

[stages.bench]
kind = "eval"
max_new_tokens = 6
tasks = [
  {{ task = "vqa", data = {evqa}, limit = 4 }},
  {{ task = "pope", data = {epope}, limit = 4, hint = "Answer yes or no.", shots = 1 }},
  {{ task = "mc", data = {emc}, limit = 3, split = "held_in" }},
  {{ task = "caption", data = {ecap}, limit = 3 }},
]

[heldout]
limit = 3
max_new_tokens = 6
tasks = [{{ name = "question", path = {vqa} }}]
"#,
        out = out.display().to_string(),
        tok = p("tokenizer"),
        cap = p("captions_train.json"),
        inst = p("instruct_train.json"),
        text = p("text_train.json"),
        vqa = p("vqa_heldout.json"),
        evqa = p("eval/heldout/vqa.jsonl"),
        epope = p("eval/heldout/pope_adversarial.json"),
        emc = p("eval/heldin/mc.jsonl"),
        ecap = p("eval/heldout/captions.jsonl"),
    )
}

fn load(path: &Path) -> mitune::recipe::schema::Recipe {
    mitune::recipe::load(path, &[])
        .unwrap_or_else(|e| panic!("{}", e.join("\n")))
        .0
}

fn multi_turn() -> Sample {
    Sample {
        id: "t".into(),
        origin: "t".into(),
        source: 0,
        images: vec![PathBuf::from("x.png")],
        videos: vec![],
        messages: vec![
            (Role::User, "<image>\nWhat colour is the circle?".into()),
            (Role::Assistant, "red".into()),
            (Role::User, "How many shapes are there?".into()),
            (Role::Assistant, "two".into()),
            (Role::User, "Describe the image.".into()),
            (
                Role::Assistant,
                "a red circle at the top left and a blue square at the bottom right.".into(),
            ),
        ],
        raw_text: None,
        meta: serde_json::Value::Null,
    }
}

#[test]
fn loss_mask_per_template_decodes_to_the_answers() {
    let d = scratch("mask");
    let w = world(&d);
    let rc = load(&{
        let p = d.join("r.toml");
        std::fs::write(&p, recipe(&w, &d.join("runs"))).unwrap();
        p
    });
    let built = build::build(&rc.model, false, &Device::flex()).unwrap();
    let tp = &built.text;
    for t in [Template::VicunaV1, Template::Llama2, Template::Chatml] {
        let src = templates::source(t, tp).unwrap();
        let e = templates::encode(tp, &src, &multi_turn(), 0, 512)
            .unwrap_or_else(|m| panic!("{t:?}: {m}"));
        let text = tp.decode(&e.supervised_ids());
        // Every answer, in order, and nothing of the questions or the template's own words.
        let mut at = 0;
        for a in [
            "red",
            "two",
            "a red circle at the top left and a blue square at the bottom right.",
        ] {
            let found = text[at..]
                .find(a)
                .unwrap_or_else(|| panic!("{t:?}: {a:?} not supervised in {text:?}"));
            at += found + a.len();
        }
        for q in ["colour", "How many", "Describe", "USER", "[INST]", "user"] {
            assert!(!text.contains(q), "{t:?}: {q:?} supervised: {text:?}");
        }
        // Image placeholders are never targets.
        assert!(
            e.ids
                .iter()
                .zip(&e.labels)
                .all(|(&i, &l)| !(l && i == tp.image_token_id))
        );
    }
    // Plain (pre-training): only the caption (one turn).
    let mut s = multi_turn();
    s.messages.truncate(2);
    let src = templates::source(Template::Plain, tp).unwrap();
    let e = templates::encode(tp, &src, &s, 0, 512).unwrap();
    assert_eq!(tp.decode(&e.supervised_ids()).trim(), "red");
    // Truncation that would cut image tokens is refused, not silently applied.
    let err = templates::encode(tp, &src, &s, 0, 10).unwrap_err();
    assert!(err.reason.contains("cut image tokens"), "{err}");
    assert_eq!(err.kind, mitune::data::contract::Kind::TooLong);
}

fn values(model: &Llava) -> Vec<(String, Vec<f32>)> {
    struct V(Vec<String>, Vec<(String, Vec<f32>)>);
    impl burn::module::ModuleVisitor for V {
        fn enter_module(&mut self, n: &str, _: &str) {
            self.0.push(n.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
            self.1.push((self.0.join("."), to_vec(p.val())));
        }
    }
    let mut v = V(vec![], vec![]);
    model.visit(&mut v);
    v.1
}

/// A scratch dir with a world, the tiny recipe, and its model built on the autodiff device.
fn setup(
    tag: &str,
) -> (
    PathBuf,
    mitune::recipe::schema::Recipe,
    build::Built,
    Device,
) {
    let d = scratch(tag);
    let w = world(&d);
    let p = d.join("r.toml");
    std::fs::write(&p, recipe(&w, &d.join("runs"))).unwrap();
    let rc = load(&p);
    let device = Device::flex().autodiff();
    device.seed(rc.seed);
    let built = build::build(&rc.model, false, &device).unwrap();
    (d, rc, built, device)
}

/// The instruct stage's first eight samples (and what they need), prepared with the tiny recipe.
fn eight_samples(tag: &str) -> (build::Built, Device, Vec<templates::Encoded>) {
    let (d, rc, built, device) = setup(tag);
    let t = rc.stages["instruct"].train().unwrap();
    let src = templates::source(t.template, &built.text).unwrap();
    let data = mitune::data::prepare::prepare(
        &t.data,
        &built.text,
        &src,
        384,
        0,
        OnBad::Fail,
        &d,
        "skipped.jsonl",
        "data",
    )
    .unwrap();
    let eight = data.encoded.into_iter().take(8).collect();
    (built, device, eight)
}

/// Summed loss (over the batch's supervised tokens) and accumulated gradients of a list of micro-batches.
fn loss_and_grads(
    model: &Llava,
    micros: &[MicroBatch],
    device: &Device,
) -> (f64, burn::optim::GradientsParams) {
    let total: usize = micros.iter().map(|m| m.supervised).sum();
    let mut acc = GradientsAccumulator::<Llava>::new();
    let mut loss = 0.0;
    for mb in micros {
        let l = trainer::micro_loss(model, mb, device)
            .unwrap()
            .div_scalar(total as f64);
        loss += l.clone().into_scalar::<f32>() as f64;
        acc.accumulate(model, GradientsParams::from_grads(l.backward(), model));
    }
    (loss, acc.grads())
}

/// Relative loss difference and the largest 2-D gradient difference relative to that gradient's largest entry.
fn differences(
    model: &Llava,
    (l1, g1): &(f64, burn::optim::GradientsParams),
    (l2, g2): &(f64, burn::optim::GradientsParams),
) -> (f64, f32) {
    let mut checked = 0;
    let mut worst = 0f32;
    for info in params::list(model).into_iter().filter(|p| p.rank == 2) {
        let (Some(a), Some(b)) = (g1.get::<2>(info.id), g2.get::<2>(info.id)) else {
            continue;
        };
        let (a, b) = (to_vec(a), to_vec(b));
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-8);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(diff / scale);
        checked += 1;
    }
    assert!(checked > 10, "only {checked} 2-D gradients compared");
    ((l1 - l2).abs() / l1.abs(), worst)
}

/// Losses within 1e-5 relative and every 2-D gradient within 1e-5 of its largest entry.
fn assert_same(
    model: &Llava,
    a: &(f64, burn::optim::GradientsParams),
    b: &(f64, burn::optim::GradientsParams),
) {
    // Relative: the fresh tiny model's loss is ≈47 (burn's N(0,1) embedding init), where f32 rounding alone is ~1e-6.
    let (loss, grad) = differences(model, a, b);
    assert!(loss < 1e-5, "loss {} vs {}: relative {loss}", a.0, b.0);
    assert!(grad < 1e-5, "gradients differ by {grad} relative");
}

#[test]
fn accumulation_averages_like_one_big_batch() {
    let (built, device, eight) = eight_samples("accum");
    let pad = built.text.pad_id();
    let refs: Vec<_> = eight.iter().collect();
    let micros = |micro: usize| -> Vec<MicroBatch> {
        refs.chunks(micro)
            .map(|c| micro_batch(c, pad, &built.images))
            .collect()
    };
    let model = &built.model;
    assert_same(
        model,
        &loss_and_grads(model, &micros(8), &device),
        &loss_and_grads(model, &micros(2), &device),
    );
}

/// Sequence packing: the same eight samples in fewer, fuller rows give the unpacked loss and gradients (no
/// attention across samples, positions restarting), with less padding; without the segments they would not.
#[test]
fn packed_rows_give_the_unpacked_loss_and_gradients() {
    let (built, device, eight) = eight_samples("pack");
    let pad = built.text.pad_id();
    let model = &built.model;
    let refs: Vec<_> = eight.iter().collect();
    let plain = vec![micro_batch(&refs, pad, &built.images)];
    let len: Vec<usize> = eight.iter().map(|e| e.ids.len()).collect();
    let longest = *len.iter().max().unwrap();
    let idx: Vec<usize> = (0..8).collect();
    let rows = pack_rows(&idx, &len, 2 * longest);
    assert!(rows.len() < 8, "nothing packed: {rows:?}");
    let rows: Vec<Vec<_>> = rows
        .iter()
        .map(|r| r.iter().map(|&i| &eight[i]).collect())
        .collect();
    let packed = vec![micro_batch_rows(&rows, pad, &built.images, true)];
    let padding = |m: &MicroBatch| 1.0 - m.real as f64 / m.tokens as f64;
    assert_eq!(plain[0].real, packed[0].real);
    assert_eq!(plain[0].supervised, packed[0].supervised);
    assert!(
        padding(&packed[0]) < padding(&plain[0]),
        "padding {} packed vs {} unpacked",
        padding(&packed[0]),
        padding(&plain[0])
    );
    let unpacked = loss_and_grads(model, &plain, &device);
    assert_same(model, &unpacked, &loss_and_grads(model, &packed, &device));
    // the check can fail: the same rows with attention across samples and running positions
    let mut leaky = packed;
    leaky[0].segments.clear();
    let (_, grad) = differences(model, &unpacked, &loss_and_grads(model, &leaky, &device));
    assert!(
        grad > 1e-3,
        "packing without segments should change the gradients: {grad} relative"
    );
}

#[test]
fn frozen_parts_stay_bit_identical() {
    let (d, rc, built, device) = setup("freeze");
    let before = values(&built.model);
    let mut metrics = mitune::stages::log::Metrics::open(&d.join("metrics.jsonl")).unwrap();
    let ctx = steps::StageRun {
        name: "align",
        spec: &rc.stages["align"],
        dir: d.join("align"),
        seed: 0,
        device: &device,
        metrics: &mut metrics,
    };
    let after = values(&trainer::run(ctx, built, None).unwrap().model);
    let mut changed = 0;
    for ((path, a), (_, b)) in before.iter().zip(&after) {
        if path.starts_with("multi_modal_projector") {
            changed += usize::from(a != b);
        } else {
            assert!(a == b, "{path} changed although only the connector trains");
        }
    }
    assert_eq!(changed, 4, "every connector tensor should have moved");
}

/// `pack = true` and `checkpoint_activations = true` end to end: the instruct stage's losses follow the plain
/// run's step for step (same global batches, same math; only the summation order differs), the packed rows carry
/// less padding.
#[test]
fn packed_and_checkpointed_instruct_stages_follow_the_plain_run() {
    let d = scratch("packrun");
    let w = world(&d);
    let variant = |out: &str, line: &str| {
        let r = recipe(&w, &d.join(out))
            .replace(r#", "bench"]"#, "]")
            .replace("max_len = 384\n", &format!("max_len = 384\n{line}"));
        assert!(r.contains(line));
        let path = d.join(format!("{out}.toml"));
        std::fs::write(&path, r).unwrap();
        path
    };
    let runs = [
        variant("runs-a", ""),
        variant("runs-b", "pack = true\n"),
        variant("runs-c", "checkpoint_activations = true\n"),
    ];
    for r in &runs {
        let (ok, err) = run_mitune(&["train", r.to_str().unwrap()], None);
        assert!(ok, "{err}");
    }
    let instruct = |run: &str| -> Vec<(f64, f64)> {
        std::fs::read_to_string(d.join(run).join("tiny/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["stage"] == "instruct" && v.get("loss").is_some())
            .map(|v| (v["loss"].as_f64().unwrap(), v["padding"].as_f64().unwrap()))
            .collect()
    };
    let la = instruct("runs-a");
    assert_eq!(la.len(), 6, "{la:?}");
    for (run, what) in [("runs-b", "packed"), ("runs-c", "checkpointed")] {
        let lb = instruct(run);
        assert_eq!(la.len(), lb.len());
        for ((x, _), (y, _)) in la.iter().zip(&lb) {
            assert!(
                (x - y).abs() / x.abs() < 1e-4,
                "loss {x} plain vs {y} {what}"
            );
        }
    }
    let mean = |v: &[(f64, f64)]| v.iter().map(|p| p.1).sum::<f64>() / v.len() as f64;
    let (pa, pb) = (mean(&la), mean(&instruct("runs-b")));
    assert!(pb < pa, "padding {pb} packed vs {pa} unpacked");
}

/// Activation checkpointing per block gives the plain path's loss and gradients for every trained parameter
/// (encoder, connector, each block, head), on padded and on packed rows; the same parameters get gradients.
#[test]
fn checkpointed_blocks_give_the_plain_loss_and_gradients() {
    let (built, device, eight) = eight_samples("ckpt");
    let pad = built.text.pad_id();
    let model = &built.model;
    let refs: Vec<_> = eight.iter().collect();
    let padded: Vec<MicroBatch> = refs
        .chunks(4)
        .map(|c| micro_batch(c, pad, &built.images))
        .collect();
    let len: Vec<usize> = eight.iter().map(|e| e.ids.len()).collect();
    let longest = *len.iter().max().unwrap();
    let idx: Vec<usize> = (0..8).collect();
    let rows: Vec<Vec<_>> = pack_rows(&idx, &len, 2 * longest)
        .iter()
        .map(|r| r.iter().map(|&i| &eight[i]).collect())
        .collect();
    let packed = vec![micro_batch_rows(&rows, pad, &built.images, true)];
    for micros in [padded, packed] {
        let total: usize = micros.iter().map(|m| m.supervised).sum();
        let mut acc = GradientsAccumulator::<Llava>::new();
        let mut loss = 0.0;
        for mb in &micros {
            let (l, g) = trainer::micro_grads(model, mb, &device, total as f64, true).unwrap();
            loss += l;
            acc.accumulate(model, g);
        }
        let plain = loss_and_grads(model, &micros, &device);
        let checkpointed = (loss, acc.grads());
        let has = |g: &GradientsParams, info: &params::ParamInfo| match info.rank {
            1 => g.get::<1>(info.id).is_some(),
            2 => g.get::<2>(info.id).is_some(),
            3 => g.get::<3>(info.id).is_some(),
            _ => g.get::<4>(info.id).is_some(),
        };
        let all = params::list(model);
        assert!(all.iter().filter(|i| has(&plain.1, i)).count() > 20);
        for info in &all {
            assert_eq!(
                has(&plain.1, info),
                has(&checkpointed.1, info),
                "{} has a gradient on one path only",
                info.path
            );
        }
        assert_same(model, &plain, &checkpointed);
    }
}

#[test]
fn pipeline_killed_mid_stage_resumes_exactly() {
    let d = scratch("resume");
    let w = world(&d);
    let a = d.join("a.toml");
    let b = d.join("b.toml");
    std::fs::write(&a, recipe(&w, &d.join("runs-a"))).unwrap();
    std::fs::write(&b, recipe(&w, &d.join("runs-b"))).unwrap();
    let (ok, err) = run_mitune(&["train", a.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let run_a = d.join("runs-a/tiny");
    for f in [
        "recipe.toml",
        "metrics.jsonl",
        "summary.json",
        "heldout-init.json",
        "align/model/config.json",
        "instruct/model/model.safetensors",
        "instruct/model/chat_template.jinja",
        "instruct/heldout.json",
    ] {
        assert!(run_a.join(f).exists(), "{f} missing");
    }
    // Killed abruptly after step 5 of instruct (last checkpoint: step 4), then resumed.
    let (ok, _) = run_mitune(
        &["train", b.to_str().unwrap()],
        Some(("MITUNE_FAULT_ABORT_AT_STEP", "instruct:5")),
    );
    assert!(!ok, "the fault should have killed the run");
    let run_b = d.join("runs-b/tiny");
    assert!(!run_b.join("instruct/done.json").exists());
    let (ok, err) = run_mitune(&["train", b.to_str().unwrap()], None);
    assert!(
        !ok && err.contains("--resume"),
        "an existing run needs --resume or --fresh: {err}"
    );
    let (ok, err) = run_mitune(&["train", b.to_str().unwrap(), "--resume"], None);
    assert!(ok, "{err}");
    assert!(err.contains("resuming at step 4/6"), "{err}");
    let (la, lb) = (losses(&run_a), losses(&run_b));
    assert_eq!(la.len(), 10, "4 align + 6 instruct steps: {la:?}");
    assert_eq!(la, lb, "resumed losses differ from the uninterrupted run");
    // Only the last K=2 checkpoints are kept; the stage's model loads for generation.
    let cks: Vec<_> = std::fs::read_dir(run_b.join("instruct/checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(cks.len(), 2);
    let model = run_b.join("instruct/model");
    let (ok, err) = run_mitune(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "<image>\nWhat is this?",
            "--image",
            w.join("images/heldout/00000.png").to_str().unwrap(),
            "--max-new-tokens",
            "3",
        ],
        None,
    );
    assert!(ok, "{err}");

    // The eval stage ran after instruct: one report per task, logged, summarized.
    let reports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_b.join("bench/eval.json")).unwrap())
            .unwrap();
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 4);
    for (r, (task, n, key)) in reports.iter().zip([
        ("vqa", 4, "accuracy"),
        ("pope", 4, "f1"),
        ("mc", 3, "accuracy"),
        ("caption", 3, "cider"),
    ]) {
        assert_eq!(r["task"], task);
        assert_eq!(r["n"], n);
        assert_eq!(r["predictions"].as_array().unwrap().len(), n);
        assert!(r["metrics"][key].is_number(), "{r}");
    }
    assert_eq!(reports[2]["split"], "held_in");
    let metrics = std::fs::read_to_string(run_b.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.matches("\"eval\":").count(), 4);
    let summary = std::fs::read_to_string(run_b.join("summary.json")).unwrap();
    assert!(summary.contains("\"cider\""), "{summary}");

    // `mitune eval` on the trained model: JSON report, M-ICL with two images per prompt, M-CoT.
    let out = Command::new(env!("CARGO_BIN_EXE_mitune"))
        .args([
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--task",
            "pope",
            "--data",
            w.join("eval/heldout/pope_random.json").to_str().unwrap(),
            "--limit",
            "5",
            "--shots",
            "2",
            "--max-new-tokens",
            "4",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["n"], 5);
    assert_eq!(r["shots"], 2);
    for k in ["accuracy", "precision", "recall", "f1", "yes_ratio"] {
        assert!(r["metrics"][k].is_number(), "{k}: {r}");
    }
    let (ok, err) = run_mitune(
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--task",
            "mc",
            "--data",
            w.join("eval/heldout/mc.jsonl").to_str().unwrap(),
            "--limit",
            "2",
            "--cot",
            "--max-new-tokens",
            "8",
        ],
        None,
    );
    assert!(ok, "{err}");

    // `mitune chat`: piped input, an image attached by command, two turns, then quit.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mitune"))
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "4",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let img = w.join("images/heldout/00001.png");
        write!(
            stdin,
            "/image {}\nWhat is this?\n/image /no/such.png\nHow many shapes are there?\n/reset\nHi\n/quit\n",
            img.display()
        )
        .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let answers = String::from_utf8_lossy(&out.stdout).matches('\n').count();
    assert!(
        answers >= 3,
        "three answers, each ended by a newline: {answers}"
    );
    assert!(stderr.contains("(conversation cleared)"), "{stderr}");
    assert!(
        stderr.contains("/no/such.png"),
        "a bad image path is reported: {stderr}"
    );
}

/// A stage model's `chat_template.jinja` is the template it trained with; `template = "tokenizer"` in a later
/// stage still means the LLM's own, kept beside it.
#[test]
fn tokenizer_template_survives_a_stage_trained_with_another() {
    let (d, _, mut built, _) = setup("base-template");
    built.text.chat_template = Some("{{ 'OWN' }}".into());
    built.text.base_chat_template = built.text.chat_template.clone();
    let out = d.join("after-align");
    let plain = templates::source(Template::Plain, &built.text).unwrap();
    build::export(
        &built.model.valid(),
        &built.text,
        &built.processor,
        Some(&plain),
        None,
        &out,
    )
    .unwrap();
    let again = build::load_dir(&out, &Device::flex()).unwrap();
    assert_eq!(
        templates::source(Template::Tokenizer, &again.text).unwrap(),
        plain
    );
    assert_eq!(
        templates::training_source(Template::Tokenizer, &again.text).unwrap(),
        "{{ 'OWN' }}"
    );
    // exported again with the LLM's own template, the extra file goes away
    let own = again.text.base_chat_template.clone().unwrap();
    build::export(
        &again.model,
        &again.text,
        &again.processor,
        Some(&own),
        None,
        &out,
    )
    .unwrap();
    assert!(!out.join("base_chat_template.jinja").exists());
}
