//! Preference data and the DPO stage: the public preference layouts import (each from a fixture in its
//! documented shape), bad pairs are named, and a tiny align → dpo pipeline starts at the DPO invariant (policy =
//! reference: loss ln 2, margins 0), with cached reference log-probs giving the frozen reference's losses.
mod common;

use common::{scratch, world};
use mitune::data::preference::{PairFormat, load_pairs};
use mitune::data::sources::Role;
use std::path::{Path, PathBuf};

/// The mitune binary; (success, stderr).
fn mitune(args: &[&str]) -> (bool, String) {
    common::run_mitune(args, None)
}

fn png(p: &Path) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(4, 4, image::Rgb([0, 0, 200]))
        .save(p)
        .unwrap();
}

fn format_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/formats")
        .join(name)
}

/// The fixture copied into a scratch dir with the images it names.
fn with_images(tag: &str, name: &str, images: &[&str]) -> PathBuf {
    let d = scratch(tag);
    let p = d.join(name);
    std::fs::copy(format_fixture(name), &p).unwrap();
    for i in images {
        png(&d.join(i));
    }
    p
}

#[test]
fn public_preference_layouts_import() {
    let p = with_images(
        "rlhf",
        "llava_rlhf_preference.sample.json",
        &["images/0015.png", "images/0016.png"],
    );
    let (pairs, bad) = load_pairs(PairFormat::LlavaRlhf, &p, None).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(pairs.len(), 2);
    // preference 1: output_1 chosen; 2: output_2 chosen; the replaced gpt turn is gone, history kept
    assert!(pairs[0].chosen.contains("next to it"));
    assert!(pairs[1].chosen.starts_with("All three stars"));
    assert_eq!(pairs[1].history.len(), 3);
    assert_eq!(pairs[1].history.last().unwrap().0, Role::User);

    let p = with_images(
        "rlhfv",
        "rlhf_v.sample.jsonl",
        &["images/0017.png", "images/0018.png"],
    );
    let (pairs, bad) = load_pairs(PairFormat::RlhfV, &p, None).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(pairs[1].chosen, "The triangle is green.");
    assert!(
        pairs[0].history[0].1.starts_with("<image>\nDescribe"),
        "marker placed"
    );

    let p = with_images(
        "rlaifv",
        "rlaif_v.sample.jsonl",
        &["images/0019.png", "images/0020.png"],
    );
    let (pairs, bad) = load_pairs(PairFormat::RlhfV, &p, None).unwrap();
    assert!(bad.is_empty() && pairs.len() == 2, "{bad:?}");

    let p = with_images(
        "lf",
        "llamafactory_mm_preference.sample.json",
        &["images/0025.png", "images/0026.png"],
    );
    let (pairs, bad) = load_pairs(PairFormat::Llamafactory, &p, None).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(
        pairs[1].rejected,
        "The shape on the right is also a triangle."
    );

    let p = with_images(
        "trl",
        "trl_vision_dpo.sample.jsonl",
        &["images/0023.png", "images/0024.png"],
    );
    let (pairs, bad) = load_pairs(PairFormat::Trl, &p, None).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(pairs[0].history[0].1, "<image>\nWhat shape is shown?");
    assert_eq!(pairs[0].chosen, "The shape is a blue pentagon.");

    // VLFeedback: scored completions -> every pair with different mean ratings, as Silkie's run_dpo.py
    let p = with_images(
        "vlf",
        "vlfeedback.sample.jsonl",
        &[
            "merged_images/toy-shapes-0021.jpg",
            "merged_images/toy-shapes-0022.jpg",
        ],
    );
    let (pairs, bad) = load_pairs(PairFormat::Vlfeedback, &p, None).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    let want: Vec<(String, String)> =
        std::fs::read_to_string(format_fixture("vlfeedback_silkie_pairs.sample.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["chosen"].as_str().unwrap().into(),
                    v["rejected"].as_str().unwrap().into(),
                )
            })
            .collect();
    let got: Vec<(String, String)> = pairs
        .iter()
        .filter(|p| p.id.starts_with("toy-shapes-0021"))
        .map(|p| (p.chosen.clone(), p.rejected.clone()))
        .collect();
    // the committed Silkie file is an excerpt: the first pairs of record 0021, in itertools.combinations order
    assert_eq!(got.len(), 6);
    assert_eq!(got[..want.len()], want[..]);
}

#[test]
fn bad_pairs_are_named() {
    let d = scratch("bad");
    png(&d.join("a.png"));
    std::fs::write(
        d.join("p.jsonl"),
        [
            r#"{"id": "ok", "image": "a.png", "prompt": "<image>\nQ?", "chosen": "yes", "rejected": "no"}"#,
            r#"{"id": "same", "image": "a.png", "prompt": "<image>\nQ?", "chosen": "yes", "rejected": " yes"}"#,
            r#"{"id": "empty", "image": "a.png", "prompt": "<image>\nQ?", "chosen": "", "rejected": "no"}"#,
            r#"{"id": "noimg", "image": "b.png", "prompt": "<image>\nQ?", "chosen": "yes", "rejected": "no"}"#,
            r#"{"id": "markers", "image": "a.png", "prompt": "<image><image>\nQ?", "chosen": "yes", "rejected": "no"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let (pairs, bad) = load_pairs(PairFormat::Pairs, &d.join("p.jsonl"), None).unwrap();
    assert_eq!(pairs.len(), 1);
    let reasons: Vec<String> = bad
        .iter()
        .map(|b| format!("{}: {}", b.id, b.reason))
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    // each names its file, line and id
    assert!(
        reasons[0].ends_with("p.jsonl:2 (same): chosen and rejected are the same text"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("p.jsonl:3 (empty): an empty response"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("b.png does not exist"), "{reasons:?}");
    assert!(
        reasons[3].contains("2 <image> marker(s) but 1 image(s)"),
        "{reasons:?}"
    );
}

fn recipe(w: &Path, out: &Path, reference: &str, extra: &str) -> String {
    let p = |f: &str| format!("{:?}", w.join(f).display().to_string());
    format!(
        r#"name = "tiny-dpo"
seed = 5
pipeline = ["align", "dpo"]
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

[stages.dpo]
kind = "dpo"
data = {{ sources = [{{ format = "pairs", path = {pref}, cap = 32 }}] }}
heldout = {{ sources = [{{ format = "pairs", path = {held} }}] }}
template = "vicuna_v1"
reference = "{reference}"
batch = {{ global = 8, micro = 4 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 3
max_len = 256
log_every = 1
{extra}
"#,
        out = out.display().to_string(),
        tok = p("tokenizer"),
        cap = p("captions_train.json"),
        pref = p("preference_train.jsonl"),
        held = p("preference_heldout.jsonl"),
    )
}

fn dpo_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == "dpo" && v.get("rewards/margins").is_some())
        .collect()
}

/// Also: activation checkpointing per block follows the plain run.
#[test]
fn dpo_starts_at_ln2_and_cached_reference_matches_frozen() {
    let d = scratch("dpo");
    let w = world(&d);
    let mut lines = vec![];
    for (name, reference, extra) in [
        ("frozen", "frozen", ""),
        ("cached", "cached", ""),
        ("checkpointed", "frozen", "checkpoint_activations = true"),
    ] {
        let r = d.join(format!("{name}.toml"));
        std::fs::write(
            &r,
            recipe(&w, &d.join(format!("runs-{name}")), reference, extra),
        )
        .unwrap();
        let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
        assert!(ok, "{err}");
        let run = d.join(format!("runs-{name}/tiny-dpo"));
        assert!(run.join("dpo/model/config.json").exists());
        assert_eq!(
            run.join("dpo/reference_logps.json").exists(),
            reference == "cached"
        );
        let l = dpo_lines(&run);
        assert_eq!(l.len(), 4, "3 steps + the held-out line: {l:?}");
        // step 1 is measured before the first update: policy = reference. Response log-probs are f32 sums of
        // ~100 tokens (|logp| ~ 600), so equal models agree to ~1e-5 there, not bit for bit.
        let first = &l[0];
        assert!(
            (first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4,
            "{first}"
        );
        assert!(
            first["rewards/margins"].as_f64().unwrap().abs() < 1e-4,
            "{first}"
        );
        assert_eq!(l[3]["heldout"], true);
        lines.push(l);
    }
    for (other, what) in [(&lines[1], "cached"), (&lines[2], "checkpointed")] {
        for (a, b) in lines[0].iter().zip(other) {
            for k in ["loss", "rewards/margins", "logps/chosen"] {
                let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
                assert!(
                    (x - y).abs() < 1e-4 * (1.0 + x.abs()),
                    "{k}: frozen {x} vs {what} {y}"
                );
            }
        }
    }
}

#[test]
fn preference_recipe_errors() {
    let d = scratch("errs");
    let w = world(&d);
    let r = d.join("r.toml");
    let bad_beta = r#"loss = { kind = "sigmoid", beta = 0.0 }"#;
    std::fs::write(&r, recipe(&w, &d.join("runs"), "frozen", bad_beta)).unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap()]);
    assert!(
        !ok && err.contains("stages.dpo.loss") && err.contains("beta"),
        "{err}"
    );
    let simpo_cached = r#"loss = { kind = "simpo" }"#;
    std::fs::write(&r, recipe(&w, &d.join("runs"), "cached", simpo_cached)).unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap()]);
    assert!(
        !ok && err.contains("stages.dpo.reference") && err.contains("reference-free"),
        "{err}"
    );
}

#[test]
fn reward_stage_trains_a_scalar_head_and_saves_it() {
    let d = scratch("reward");
    let w = world(&d);
    let r = d.join("r.toml");
    let text = recipe(&w, &d.join("runs"), "frozen", "")
        .replace(
            "pipeline = [\"align\", \"dpo\"]",
            "pipeline = [\"align\", \"rm\"]",
        )
        .replace(
            "[stages.dpo]\nkind = \"dpo\"",
            "[stages.rm]\nkind = \"reward\"",
        )
        .replace("reference = \"frozen\"\n", "");
    std::fs::write(&r, &text).unwrap();
    let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
    assert!(ok, "{err}");
    let run = d.join("runs/tiny-dpo");
    assert!(run.join("rm/model/score.safetensors").exists());
    let rm_lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["stage"] == "rm")
            .collect()
    };
    let lines = rm_lines();
    // the head starts at zero: every reward 0, loss ln 2, margin 0
    assert!(
        (lines[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        lines[0]
    );
    assert_eq!(lines[0]["margin"].as_f64().unwrap(), 0.0);
    let held = lines
        .iter()
        .find(|v| v["heldout"] == true)
        .expect("held-out line");
    assert_eq!(held["n"], 12, "6 held-out images x 2 pairs");
    let (rm, _) =
        mitune::stages::reward_model::load(&run.join("rm/model"), &burn::tensor::Device::flex())
            .unwrap();
    let w: Vec<f32> = mitune::zoo::layers::to_vec(rm.score.weight.val());
    assert!(w.iter().any(|&x| x != 0.0), "the head learned");
    // activation checkpointing per block runs and follows the plain run (a weak check of its gradients: the head
    // starts at zero, so little reaches the blocks in 3 steps; the gradients are checked in tests/train.rs and DPO)
    std::fs::write(
        &r,
        text.replace(
            "log_every = 1",
            "log_every = 1\ncheckpoint_activations = true",
        ),
    )
    .unwrap();
    let (ok, err) = mitune(&["train", r.to_str().unwrap(), "--fresh"]);
    assert!(ok, "{err}");
    let again = rm_lines();
    let losses = |v: &[serde_json::Value]| -> Vec<f64> {
        v.iter().filter_map(|l| l["loss"].as_f64()).collect()
    };
    let (la, lb) = (losses(&lines), losses(&again));
    assert!(la.len() >= 3 && la.len() == lb.len(), "{la:?} vs {lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert!(
            (x - y).abs() < 1e-4 * (1.0 + x.abs()),
            "loss {x} plain vs {y} checkpointed"
        );
    }
    // a reward stage takes no DPO loss
    std::fs::write(
        &r,
        text.replace("log_every = 1", "log_every = 1\nloss = { kind = \"ipo\" }"),
    )
    .unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap()]);
    assert!(!ok && err.contains("stages.rm.loss"), "{err}");
}

#[test]
fn grpo_stage_samples_groups_and_logs_rl_metrics() {
    let d = scratch("grpo");
    let w = world(&d);
    let r = d.join("r.toml");
    let p = |f: &str| format!("{:?}", w.join(f).display().to_string());
    let text = recipe(&w, &d.join("runs"), "frozen", "")
        .replace(
            "pipeline = [\"align\", \"dpo\"]",
            "pipeline = [\"align\", \"rl\"]",
        )
        .split("[stages.dpo]")
        .next()
        .unwrap()
        .to_string()
        + &format!(
            r#"[stages.rl]
kind = "grpo"
data = {{ sources = [{{ path = {tr}, cap = 16 }}] }}
heldout = {{ sources = [{{ path = {he} }}] }}
template = "vicuna_v1"
group = 3
rewards = [{{ kind = "exact_match" }}, {{ kind = "format", pattern = "^[a-z ]+$", weight = 0.1 }}]
sampling = {{ max_new_tokens = 4 }}
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 512
log_every = 1
"#,
            tr = p("prompts_train.jsonl"),
            he = p("prompts_heldout.jsonl"),
        );
    std::fs::write(&r, &text).unwrap();
    let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
    assert!(ok, "{err}");
    let run = d.join("runs/tiny-dpo");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["stage"] == "rl")
        .collect();
    let steps: Vec<&serde_json::Value> =
        lines.iter().filter(|v| v.get("reward").is_some()).collect();
    assert_eq!(steps.len(), 2, "{lines:?}");
    for s in &steps {
        for k in [
            "reward",
            "reward_std",
            "kl",
            "clip_fraction",
            "entropy",
            "completion_length",
            "loss",
        ] {
            assert!(s[k].is_number(), "{k}: {s}");
        }
        let len = s["completion_length"].as_f64().unwrap();
        assert!((1.0..=4.0).contains(&len), "{s}");
    }
    // policy = reference at the first step: KL exactly 0 up to f32 noise; ratios are 1, nothing clipped
    assert!(
        steps[0]["kl"].as_f64().unwrap().abs() < 1e-5,
        "{}",
        steps[0]
    );
    assert_eq!(steps[0]["clip_fraction"].as_f64().unwrap(), 0.0);
    assert_eq!(
        lines
            .iter()
            .filter(|v| v.get("heldout_reward").is_some())
            .count(),
        2,
        "before and after"
    );
    assert!(run.join("rl/model/config.json").exists());
    // recipe errors: a group of one, a bad pattern, a reward model that is not a reward stage
    for (from, to, want) in [
        ("group = 3", "group = 1", "stages.rl.group"),
        ("^[a-z ]+$", "([", "stages.rl.rewards"),
        (
            "{ kind = \"exact_match\" }",
            "{ kind = \"model\", from_stage = \"align\" }",
            "not a reward stage",
        ),
    ] {
        std::fs::write(&r, text.replace(from, to)).unwrap();
        let (ok, err) = mitune(&["validate", r.to_str().unwrap()]);
        assert!(!ok && err.contains(want), "{want}: {err}");
    }
}

/// align → reward model → PPO on the shapes world `w`, runs under `out`.
fn ppo_recipe(w: &Path, out: &Path) -> String {
    let p = |f: &str| format!("{:?}", w.join(f).display().to_string());
    recipe(w, out, "frozen", "")
        .replace(
            "pipeline = [\"align\", \"dpo\"]",
            "pipeline = [\"align\", \"rm\", \"rl\"]",
        )
        .replace(
            "[stages.dpo]\nkind = \"dpo\"",
            "[stages.rm]\nkind = \"reward\"",
        )
        .replace("reference = \"frozen\"\n", "")
        + &format!(
            r#"
[stages.rl]
kind = "ppo"
init = {{ from_stage = "align" }}
data = {{ sources = [{{ path = {tr}, cap = 8 }}] }}
heldout = {{ sources = [{{ path = {he} }}] }}
template = "vicuna_v1"
group = 1
rewards = [{{ kind = "model", from_stage = "rm" }}, {{ kind = "exact_match" }}]
kl_beta = 0.1
updates = 2
lam = 0.9
sampling = {{ max_new_tokens = 4 }}
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 512
log_every = 1
"#,
            tr = p("prompts_train.jsonl"),
            he = p("prompts_heldout.jsonl"),
        )
}

#[test]
fn ppo_with_a_reward_model_logs_rlhf_metrics() {
    let d = scratch("ppo");
    let w = world(&d);
    let r = d.join("r.toml");
    let text = ppo_recipe(&w, &d.join("runs"));
    std::fs::write(&r, &text).unwrap();
    let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
    assert!(ok, "{err}");
    let run = d.join("runs/tiny-dpo");
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["stage"] == "rl" && v.get("reward").is_some())
        .collect();
    assert_eq!(steps.len(), 2);
    for s in &steps {
        for k in [
            "reward",
            "kl",
            "entropy",
            "clip_fraction",
            "value_loss",
            "completion_length",
        ] {
            assert!(s[k].is_number(), "{k}: {s}");
        }
    }
    // rollouts come from the starting policy = the reference: the sampled tokens' KL is 0 at step 1
    assert!(
        steps[0]["kl"].as_f64().unwrap().abs() < 1e-5,
        "{}",
        steps[0]
    );
    assert!(run.join("rl/model/value_head.safetensors").exists());
    // GRPO-only and PPO-only settings are kept apart
    std::fs::write(&r, text.replace("kind = \"ppo\"", "kind = \"grpo\"")).unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap()]);
    assert!(
        !ok && err.contains("stages.rl.lam") && err.contains("stages.rl.group"),
        "{err}"
    );
}

/// Every stage kind stops on a non-finite loss before its optimizer touches the weights (a NaN injected into step
/// 2's loss): the run fails naming the stage and step, and the stage saves no model.
#[test]
fn every_stage_kind_stops_on_a_non_finite_loss() {
    let d = scratch("nan");
    let w = world(&d);
    let r = d.join("r.toml");
    let grpo = ppo_recipe(&w, &d.join("runs"))
        .replace("kind = \"ppo\"", "kind = \"grpo\"")
        .replace("lam = 0.9\n", "")
        .replace("group = 1", "group = 2");
    for (stage, kind, text) in [
        ("align", "align", recipe(&w, &d.join("runs"), "frozen", "")),
        ("dpo", "dpo", recipe(&w, &d.join("runs"), "frozen", "")),
        ("rm", "reward", ppo_recipe(&w, &d.join("runs"))),
        ("rl", "ppo", ppo_recipe(&w, &d.join("runs"))),
        ("rl", "grpo", grpo),
    ] {
        let _ = std::fs::remove_dir_all(d.join("runs"));
        std::fs::write(&r, &text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"))
            .args(["train", r.to_str().unwrap()])
            .env("MITUNE_FAULT_NAN_AT_STEP", format!("{stage}:2"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{kind}: {err}");
        assert!(
            err.contains(&format!("stages.{stage}")) && err.contains("loss is NaN at step 2"),
            "{kind}: {err}"
        );
        assert!(
            !d.join("runs/tiny-dpo").join(stage).join("model").exists(),
            "{kind}"
        );
    }
}

/// `validate --data` reads preference pairs and RL prompts through the same contract as instruction data: counts
/// what is usable, and a broken pair line stops it naming the file and line.
#[test]
fn validate_data_covers_pairs_and_prompts() {
    let d = scratch("validate-pref");
    let w = world(&d);
    let r = d.join("r.toml");
    std::fs::write(&r, ppo_recipe(&w, &d.join("runs"))).unwrap();
    let (stdout, _) = common::validate_data(&r);
    assert!(stdout.contains("stages.rm: 32 pairs ok"), "{stdout}");
    assert!(stdout.contains("stages.rl: 8 prompts ok"), "{stdout}");
    // the held-out pairs go through the contract too, listed apart from the training pairs
    let held = w.join("preference_heldout.jsonl");
    let original = std::fs::read_to_string(&held).unwrap();
    let n_held = original.lines().count();
    assert!(
        stdout.contains(&format!("; {n_held} held-out pairs")),
        "{stdout}"
    );
    std::fs::write(
        &held,
        format!("{original}{{\"id\": \"cut\", \"prompt\": \n"),
    )
    .unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap(), "--data"]);
    assert!(
        !ok && err.contains(&format!("preference_heldout.jsonl:{}", n_held + 1))
            && err.contains("stages.rm.heldout")
            && err.contains("skipped-heldout.jsonl"),
        "{err}"
    );
    std::fs::write(&held, original).unwrap();
    let pairs = w.join("preference_train.jsonl");
    let mut text = std::fs::read_to_string(&pairs).unwrap();
    let line = text.lines().count() + 1;
    text.push_str("{\"id\": \"cut\", \"prompt\": \n");
    std::fs::write(&pairs, text).unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap(), "--data"]);
    assert!(
        !ok && err.contains(&format!("preference_train.jsonl:{line}"))
            && err.contains("1 × record"),
        "{err}"
    );
}
