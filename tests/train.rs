//! Training on a tiny shapes world (generated into a temp dir): loss masks per template, averaged gradient
//! accumulation, freezing, and a tiny align → instruct pipeline killed mid-stage and resumed exactly.
mod common;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use common::{losses, run_mitune, scratch, world};
use mitune::data::loader::micro_batch;
use mitune::data::sources::{Role, Sample};
use mitune::data::templates;
use mitune::recipe::schema::{OnBad, Template};
use mitune::stages::{build, params, trainer};
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

#[test]
fn accumulation_averages_like_one_big_batch() {
    let (d, rc, built, device) = setup("accum");
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
    let eight: Vec<_> = data.encoded.iter().take(8).collect();
    let pad = built.text.pad_id();
    let model = &built.model;
    let grads_of = |micro: usize| {
        let total: usize = eight
            .iter()
            .map(|e| e.labels.iter().skip(1).filter(|&&l| l).count())
            .sum();
        let mut acc = GradientsAccumulator::<Llava>::new();
        let mut loss = 0.0;
        for c in eight.chunks(micro) {
            let mb = micro_batch(c, pad, &built.images);
            let l = trainer::micro_loss(model, &mb, &device)
                .unwrap()
                .div_scalar(total as f64);
            loss += l.clone().into_scalar::<f32>() as f64;
            acc.accumulate(model, GradientsParams::from_grads(l.backward(), model));
        }
        (loss, acc.grads())
    };
    let (l8, g8) = grads_of(8);
    let (l2, g2) = grads_of(2);
    // Relative: the fresh tiny model's loss is ≈47 (burn's N(0,1) embedding init), where f32 rounding alone is ~1e-6.
    assert!((l8 - l2).abs() / l8.abs() < 1e-5, "loss {l8} vs {l2}");
    let mut checked = 0;
    for info in params::list(model).into_iter().filter(|p| p.rank == 2) {
        let (Some(a), Some(b)) = (g8.get::<2>(info.id), g2.get::<2>(info.id)) else {
            continue;
        };
        let (a, b) = (to_vec(a), to_vec(b));
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-8);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff / scale < 1e-5,
            "{}: relative difference {}",
            info.path,
            diff / scale
        );
        checked += 1;
    }
    assert!(checked > 10, "only {checked} 2-D gradients compared");
}

#[test]
fn frozen_parts_stay_bit_identical() {
    let (d, rc, built, device) = setup("freeze");
    let before = values(&built.model);
    let mut metrics = mitune::stages::log::Metrics::open(&d.join("metrics.jsonl")).unwrap();
    let ctx = trainer::StageRun {
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
