//! Every capability in every stage kind: the step engine attaches LoRA adapters, checkpoints activations and
//! resumes the same way for align/instruct, dpo, reward, grpo and ppo. A tiny pipeline on the shapes world
//! (the released tiny shapes checkpoints): align → dpo → reward → grpo → ppo, each later stage with adapters, and GRPO with its
//! loss variants.
mod common;

use common::{losses, run_mitune, scratch, world};
use mitune::checkpoint::safetensors_io::WeightStore;
use std::path::Path;

fn mitune(args: &[&str]) -> (bool, String) {
    run_mitune(args, None)
}

const LORA: &str =
    r#"adapter = { kind = "lora", rank = 4, alpha = 8, targets = ["q_proj", "v_proj"] }"#;

/// The released tiny checkpoints (a model that samples varied answers: a randomly initialised one repeats its
/// last token, and its rollouts teach nothing).
fn checkpoint(name: &str) -> String {
    format!(
        "{:?}",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("checkpoints")
            .join(name)
            .display()
            .to_string()
    )
}

/// align → dpo → rm (reward) → rl (grpo) → ppo on the shapes checkpoints, runs under `out`; `grpo` and `ppo` are extra lines of those
/// stages' tables.
fn recipe(w: &Path, out: &Path, grpo: &str, ppo: &str) -> String {
    let p = |f: &str| format!("{:?}", w.join(f).display().to_string());
    format!(
        r#"name = "every"
seed = 5
pipeline = ["align", "dpo", "rm", "rl", "ppo"]
output = {out:?}

[model.encoder]
kind = "clip_vit"
weights = {vit}
feature_layer = -1

[model.connector]
kind = "mlp"
depth = 2

[model.llm]
kind = "llama"
weights = {llm}

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
data = {{ sources = [{{ format = "pairs", path = {pref}, cap = 16 }}] }}
template = "vicuna_v1"
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 256
log_every = 1
{LORA}

[stages.rm]
kind = "reward"
init = {{ from_stage = "align" }}
data = {{ sources = [{{ format = "pairs", path = {pref}, cap = 16 }}] }}
template = "vicuna_v1"
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 256
log_every = 1
{LORA}

[stages.rl]
kind = "grpo"
init = {{ from_stage = "dpo" }}
data = {{ sources = [{{ path = {tr}, cap = 16 }}] }}
template = "vicuna_v1"
group = 2
rewards = [{{ kind = "exact_match" }}, {{ kind = "model", from_stage = "rm", weight = 0.5 }}]
sampling = {{ max_new_tokens = 4 }}
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 512
log_every = 1
save_every = 1
adapter = {{ kind = "lora", rank = 4, alpha = 8, targets = ["q_proj", "v_proj"], parts = ["encoder", "llm"] }}
{grpo}

[stages.ppo]
kind = "ppo"
init = {{ from_stage = "align" }}
data = {{ sources = [{{ path = {tr}, cap = 8 }}] }}
template = "vicuna_v1"
group = 1
rewards = [{{ kind = "model", from_stage = "rm" }}, {{ kind = "exact_match" }}]
kl_beta = 0.1
updates = 2
sampling = {{ max_new_tokens = 4 }}
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 512
log_every = 1
{LORA}
{ppo}
"#,
        out = out.display().to_string(),
        vit = checkpoint("shapes-vit"),
        llm = checkpoint("shapes-llm"),
        cap = p("captions_train.json"),
        pref = p("preference_train.jsonl"),
        tr = p("prompts_train.jsonl"),
    )
}

fn lines(run: &Path, stage: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["stage"] == stage && v.get("loss").is_some())
        .collect()
}

fn tensors(dir: &Path) -> WeightStore {
    WeightStore::open_files(&[dir.join("model.safetensors")]).unwrap()
}

#[test]
fn adapters_on_every_stage_kind_save_peft_and_merge() {
    let d = scratch("stages-lora");
    let w = world(&d);
    let r = d.join("r.toml");
    std::fs::write(&r, recipe(&w, &d.join("runs"), "", "")).unwrap();
    let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
    assert!(ok, "{err}");
    let run = d.join("runs/every");
    for stage in ["dpo", "rm", "rl", "ppo"] {
        let s = run.join(stage);
        for f in [
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "base/config.json",
            "model/config.json",
        ] {
            assert!(s.join(f).exists(), "{stage}: {f}");
        }
        let l = lines(&run, stage);
        assert!(l.len() >= 2, "{stage}: {l:?}");
        assert!(l.iter().all(|v| v["loss"].as_f64().unwrap().is_finite()));
        // the adapter's factors are in PEFT's names; the connector trains in full beside them
        let a = WeightStore::open_files(&[s.join("adapter/adapter_model.safetensors")]).unwrap();
        let names: Vec<String> = a.keys().map(String::from).collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("language_model") && n.ends_with("q_proj.lora_A.weight")),
            "{stage}: {names:?}"
        );
        assert!(
            names.iter().any(|n| n.contains("multi_modal_projector")),
            "{stage}: {names:?}"
        );
        // merged = base + the learned low-rank update on the targets; every other weight is the base's
        let (base, merged) = (tensors(&s.join("base")), tensors(&s.join("model")));
        let q = "model.language_model.layers.0.self_attn.q_proj.weight";
        let k = "model.language_model.layers.0.self_attn.k_proj.weight";
        let key = |st: &WeightStore, n: &str| {
            st.get(n)
                .or_else(|_| {
                    st.get(&n.replacen("model.language_model.", "language_model.model.", 1))
                })
                .unwrap()
                .values
        };
        assert!(
            key(&base, q) != key(&merged, q),
            "{stage}: q_proj learned nothing"
        );
        assert!(
            key(&base, k) == key(&merged, k),
            "{stage}: k_proj is not a target"
        );
    }
    // the reward model and PPO's value head are saved beside both the base and the merged model
    assert!(run.join("rm/model/score.safetensors").exists());
    assert!(run.join("rm/base/score.safetensors").exists());
    assert!(run.join("ppo/model/value_head.safetensors").exists());
    // GRPO's adapters reach the vision tower (LoRA on the encoder during RL)
    let a = WeightStore::open_files(&[run.join("rl/adapter/adapter_model.safetensors")]).unwrap();
    let names: Vec<&str> = a.keys().collect();
    assert!(
        names
            .iter()
            .any(|n| n.contains("vision_tower") && n.contains("lora_B")),
        "{names:?}"
    );
    // B starts at zero, so the adapted policy starts equal to its reference: DPO's first loss is ln 2, GRPO's
    // and PPO's first KL is 0
    let dpo = lines(&run, "dpo");
    assert!(
        (dpo[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4,
        "{}",
        dpo[0]
    );
    for stage in ["rl", "ppo"] {
        let l = lines(&run, stage);
        assert!(
            l[0]["kl"].as_f64().unwrap().abs() < 1e-5,
            "{stage}: {}",
            l[0]
        );
    }
    // an adapter on a part that is trained in full is refused with its key
    let bad = recipe(&w, &d.join("runs"), "train = [\"llm\"]", "");
    std::fs::write(&r, bad).unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap()]);
    assert!(!ok && err.contains("stages.rl.adapter.parts"), "{err}");
    // a target that matches nothing in the adapter's parts stops the stage naming the key
    let bad = recipe(&w, &d.join("runs2"), "", "").replace(
        "targets = [\"q_proj\", \"v_proj\"], parts",
        "targets = [\"no_such_proj\"], parts",
    );
    std::fs::write(&r, bad).unwrap();
    let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
    assert!(
        !ok && err.contains("stages.rl.adapter.targets") && err.contains("no_such_proj"),
        "{err}"
    );
}

/// GRPO's family (loss types, clip-higher, GSPO, reward scaling) runs end to end with adapters and activation
/// checkpointing; a killed GRPO run with adapters resumes to the same losses.
#[test]
fn grpo_variants_run_and_a_killed_adapted_run_resumes_exactly() {
    let d = scratch("stages-grpo");
    let w = world(&d);
    let r = d.join("r.toml");
    let one = |grpo: &str, out: &str| {
        recipe(&w, &d.join(out), grpo, "")
            .replace(
                "pipeline = [\"align\", \"dpo\", \"rm\", \"rl\", \"ppo\"]",
                "pipeline = [\"align\", \"dpo\", \"rm\", \"rl\"]",
            )
            .replace(
                "max_steps = 2\nmax_len = 512\nlog_every = 1\nsave_every = 1",
                "max_steps = 4\nmax_len = 512\nlog_every = 1\nsave_every = 1",
            )
    };
    // plain vs activation checkpointing: the same losses
    let variants = [
        "loss_type = \"dapo\"\nepsilon_high = 0.28\nupdates = 2\ndynamic_sampling = 2",
        "loss_type = \"dr_grpo\"\nscale_rewards = \"none\"",
        "loss_type = \"bnpo\"\nimportance_sampling_level = \"sequence\"\nscale_rewards = \"batch\"\nupdates = 2",
    ];
    for (i, v) in variants.iter().enumerate() {
        let mut got = vec![];
        for extra in ["", "\ncheckpoint_activations = true"] {
            let out = format!("v{i}{}", extra.len());
            std::fs::write(&r, one(&format!("{v}{extra}"), &out)).unwrap();
            let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
            assert!(ok, "{v}: {err}");
            let l = lines(&d.join(out).join("every"), "rl");
            assert_eq!(l.len(), 4, "{v}: {l:?}");
            // DAPO's dynamic sampling: groups whose rewards are all equal were seen and refilled
            if v.contains("dynamic_sampling") {
                let f = |k: &str| l.iter().map(|x| x[k].as_f64().unwrap()).sum::<f64>();
                assert!(
                    f("frac_reward_zero_std") > 0.0 && f("refill_rounds") > 0.0,
                    "{v}: {l:?}"
                );
            }
            got.push(l);
        }
        for (a, b) in got[0].iter().zip(&got[1]) {
            let (x, y) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
            assert!(
                (x - y).abs() < 1e-4 * (1.0 + x.abs()),
                "{v}: plain {x} vs checkpointed {y}"
            );
        }
    }
    // GRPO-only keys are refused on PPO
    let bad = recipe(&w, &d.join("runs"), "", "loss_type = \"dapo\"");
    std::fs::write(&r, bad).unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap()]);
    assert!(!ok && err.contains("stages.ppo.loss_type"), "{err}");
    // kill after step 3's update, resume: the same losses as the uninterrupted run
    let (a, b) = common::train_kill_resume(&d, "every", "rl", |out| one(variants[0], out));
    let rl = |v: &[((String, u64), String)]| -> Vec<String> {
        v.iter()
            .filter(|((s, _), _)| s == "rl")
            .map(|(_, l)| l.clone())
            .collect()
    };
    assert_eq!(rl(&a).len(), 4, "{a:?}");
    assert_eq!(rl(&a), rl(&b));
    assert_eq!(
        losses(&d.join("runs-a/every")).len(),
        losses(&d.join("runs-b/every")).len()
    );
}

/// The shapes world's preference pairs as KTO records (chosen desirable, rejected undesirable), in TRL's
/// unpaired layout plus the image; `extra` lines appended.
fn kto_records(w: &Path, extra: &str) -> std::path::PathBuf {
    let mut out = String::new();
    for l in std::fs::read_to_string(w.join("preference_train.jsonl"))
        .unwrap()
        .lines()
        .take(16)
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        for (k, label) in [("chosen", true), ("rejected", false)] {
            let r = serde_json::json!({
                "id": format!("{}-{k}", v["id"].as_str().unwrap()), "image": v["image"], "prompt": v["prompt"],
                "completion": v[k], "label": label,
            });
            out.push_str(&format!("{r}\n"));
        }
    }
    out.push_str(extra);
    let f = w.join("kto_train.jsonl");
    std::fs::write(&f, out).unwrap();
    f
}

fn kto_recipe(w: &Path, out: &Path, kto: &Path, extra: &str) -> String {
    let held = format!(
        "{:?}",
        w.join("preference_heldout.jsonl").display().to_string()
    );
    recipe(w, out, "", "").replace(
        "pipeline = [\"align\", \"dpo\", \"rm\", \"rl\", \"ppo\"]",
        "pipeline = [\"align\", \"kto\"]",
    ) + &format!(
        r#"
[stages.kto]
kind = "kto"
data = {{ sources = [{{ format = "kto", path = {kto:?} }}] }}
heldout = {{ sources = [{{ format = "pairs", path = {held}, cap = 4 }}] }}
template = "vicuna_v1"
beta = 0.5
undesirable_weight = 1.5
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 4
max_len = 256
log_every = 1
save_every = 1
{LORA}
{extra}
"#,
        kto = kto.display().to_string(),
    )
}

/// KTO on unpaired examples (TRL's layout with images, and pairs read unpaired for the held-out split), with
/// adapters: it starts at the loss of equal policy and reference, logs TRL's metrics, a killed run resumes exactly,
/// and a record whose label is not a boolean is a located error.
#[test]
fn kto_stage_trains_on_unpaired_examples() {
    let d = scratch("stages-kto");
    let w = world(&d);
    let kto = kto_records(&w, "");
    let r = d.join("r.toml");
    std::fs::write(&r, kto_recipe(&w, &d.join("runs"), &kto, "")).unwrap();
    let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
    assert!(ok, "{err}");
    let run = d.join("runs/every");
    let l = lines(&run, "kto");
    assert_eq!(l.len(), 5, "4 steps + the held-out line: {l:?}");
    // step 1: π = π_ref, so ρ = 0 and the KL baseline z = 0: every loss is w·(1 − σ(0)) = w/2; the first batch's
    // desirable and undesirable counts weigh 1 and 1.5
    let (nd, nu) = (
        l[0]["count/chosen"].as_f64().unwrap(),
        l[0]["count/rejected"].as_f64().unwrap(),
    );
    assert_eq!(nd + nu, 4.0, "{}", l[0]);
    let want = (0.5 * nd + 0.75 * nu) / 4.0;
    assert!(
        (l[0]["loss"].as_f64().unwrap() - want).abs() < 1e-4,
        "{} vs {want}",
        l[0]
    );
    assert!(l[0]["kl"].as_f64().unwrap().abs() < 1e-4, "{}", l[0]);
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(l[3][k].is_number(), "{k}: {}", l[3]);
    }
    assert_eq!(l[4]["heldout"], true);
    // cap = 4 examples: the first 2 held-out pairs, unpaired
    assert_eq!(
        (
            l[4]["count/chosen"].as_f64(),
            l[4]["count/rejected"].as_f64()
        ),
        (Some(2.0), Some(2.0)),
        "{}",
        l[4]
    );
    assert!(run.join("kto/adapter/adapter_config.json").exists());
    assert!(run.join("kto/model/config.json").exists());
    // `eval_every = 2`: the held-out examples also after step 2, and the run itself unchanged
    let evals = |out: &str, extra: &str| {
        std::fs::write(&r, kto_recipe(&w, &d.join(out), &kto, extra)).unwrap();
        let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
        assert!(ok, "{err}");
        lines(&d.join(out).join("every"), "kto")
            .into_iter()
            .filter(|x| x["heldout"] == true)
            .collect::<Vec<_>>()
    };
    let every = evals("runs-eval", "eval_every = 2");
    let steps: Vec<u64> = every.iter().map(|x| x["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4], "{every:?}");
    assert_eq!(
        every[1]["loss"], l[4]["loss"],
        "evaluating mid-stage changed the run"
    );
    // without a held-out set there is nothing to evaluate: refused before anything runs
    let text = kto_recipe(&w, &d.join("runs-x"), &kto, "eval_every = 2");
    let cut: String = text
        .lines()
        .filter(|x| !x.starts_with("heldout = "))
        .map(|x| format!("{x}\n"))
        .collect();
    std::fs::write(&r, cut).unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap()]);
    assert!(
        !ok && err.contains("stages.kto.eval_every") && err.contains("heldout"),
        "{err}"
    );
    // killed after step 3, resumed: the same losses
    let (a, b) = common::train_kill_resume(&d, "every", "kto", |out| {
        kto_recipe(&w, &d.join(out), &kto, "")
    });
    assert_eq!(a, b);
    // a label that is not a boolean: the record is named, with what to write
    let bad = kto_records(
        &w,
        "{\"id\": \"odd\", \"image\": \"images/train/00000.png\", \"prompt\": \"<image>\\nWhat?\", \"completion\": \"x\", \"label\": \"yes\"}\n",
    );
    std::fs::write(&r, kto_recipe(&w, &d.join("runs-bad"), &bad, "")).unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap(), "--data"]);
    assert!(
        !ok && err.contains("kto_train.jsonl:33")
            && err.contains("odd")
            && err.contains("`label` must be true"),
        "{err}"
    );
    // with on_bad_sample = "skip" it is listed and training goes on
    std::fs::write(
        &r,
        kto_recipe(&w, &d.join("runs-skip"), &bad, "on_bad_sample = \"skip\""),
    )
    .unwrap();
    let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
    assert!(ok, "{err}");
    let skipped = std::fs::read_to_string(d.join("runs-skip/every/kto/skipped.jsonl")).unwrap();
    assert!(skipped.contains("odd"), "{skipped}");
    // micro-batches of one have no other completion for the KL baseline
    std::fs::write(
        &r,
        kto_recipe(&w, &d.join("runs"), &kto, "").replace(
            "batch = { global = 4, micro = 2 }\noptim = { kind = \"adamw\", lr = 1e-3 }\nmax_steps = 4",
            "batch = { global = 4, micro = 1 }\noptim = { kind = \"adamw\", lr = 1e-3 }\nmax_steps = 4",
        ),
    )
    .unwrap();
    let (ok, err) = mitune(&["validate", r.to_str().unwrap()]);
    assert!(!ok && err.contains("stages.kto.batch"), "{err}");
}

/// GRPO scored by a program of the user's (`kind = "command"`): it reads each rollout as a JSON line and prints a
/// score; when it fails mid-stage (a non-zero exit, its stderr in the error) no update is made with the step's
/// rewards, the last checkpoint stays, and `--resume` once it is fixed gives the losses of a run that never failed.
#[test]
fn a_reward_command_scores_rollouts_and_its_failure_loses_nothing() {
    let d = scratch("stages-command");
    let w = world(&d);
    let script = d.join("score.sh");
    let seen = d.join("seen.jsonl");
    // the score: the JSON line's length mod 3 (varied, so groups have signal), every line kept for the checks below
    let working = format!(
        "tee -a {:?} | awk '{{ print length($0) % 3 }}'\n",
        seen.display().to_string()
    );
    // fails from its 5th call: steps 1 and 2 (two micro-batches each) are scored, step 3 is not
    let failing = format!(
        "n=$(cat {c:?} 2>/dev/null || echo 0); echo $((n + 1)) > {c:?}\n\
         if [ \"$n\" -ge 4 ]; then echo 'reward server down' >&2; exit 2; fi\n{working}",
        c = d.join("calls").display().to_string()
    );
    let one = |out: &str| {
        recipe(&w, &d.join(out), "", "")
            .replace(
                "pipeline = [\"align\", \"dpo\", \"rm\", \"rl\", \"ppo\"]",
                "pipeline = [\"align\", \"rl\"]",
            )
            .replace("init = { from_stage = \"dpo\" }", "init = { from_stage = \"align\" }")
            .replace(
                "rewards = [{ kind = \"exact_match\" }, { kind = \"model\", from_stage = \"rm\", weight = 0.5 }]",
                &format!(
                    "rewards = [{{ kind = \"command\", command = [\"sh\", {:?}], timeout_s = 60 }}]",
                    script.display().to_string()
                ),
            )
            .replace(
                "max_steps = 2\nmax_len = 512\nlog_every = 1\nsave_every = 1",
                "max_steps = 4\nmax_len = 512\nlog_every = 1\nsave_every = 1",
            )
    };
    let (a, b) = (d.join("a.toml"), d.join("b.toml"));
    std::fs::write(&a, one("runs-a")).unwrap();
    std::fs::write(&b, one("runs-b")).unwrap();
    std::fs::write(&script, &working).unwrap();
    let (ok, err) = mitune(&["train", a.to_str().unwrap()]);
    assert!(ok, "{err}");
    let want = lines(&d.join("runs-a/every"), "rl");
    assert_eq!(want.len(), 4);
    // 4 steps × 4 prompts × group 2 rollouts, each a JSON line with what a scorer needs
    let read = std::fs::read_to_string(&seen).unwrap();
    assert_eq!(read.lines().count(), 32);
    for l in read.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        for k in [
            "id",
            "prompt",
            "conversation",
            "completion",
            "answer",
            "images",
        ] {
            assert!(v.get(k).is_some(), "{k} missing from {l}");
        }
        assert!(v["images"][0].as_str().unwrap().ends_with(".png"), "{l}");
    }
    assert!(
        want.iter()
            .any(|l| l["reward"].as_f64().unwrap() != want[0]["reward"].as_f64().unwrap()),
        "the command's scores reach the logged reward: {want:?}"
    );

    std::fs::write(&script, &failing).unwrap();
    let (ok, err) = mitune(&["train", b.to_str().unwrap()]);
    assert!(!ok, "the failing command should stop the stage");
    assert!(
        err.contains("reward 0")
            && err.contains("exit status: 2")
            && err.contains("reward server down"),
        "{err}"
    );
    let run = d.join("runs-b/every");
    assert_eq!(
        lines(&run, "rl").len(),
        2,
        "step 3 was logged with a broken reward"
    );
    let ckpts: Vec<String> = mitune::stages::checkpoints::list(&run.join("rl"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into())
        .collect();
    assert_eq!(ckpts, ["step-000001", "step-000002"]);
    std::fs::write(&script, &working).unwrap();
    let (ok, err) = mitune(&["train", b.to_str().unwrap(), "--resume"]);
    assert!(ok, "{err}");
    let got = lines(&run, "rl");
    assert_eq!(got.len(), 4);
    for (x, y) in want.iter().zip(&got) {
        assert_eq!(
            x["loss"], y["loss"],
            "resumed after the failure: {x} vs {y}"
        );
        assert_eq!(x["reward"], y["reward"]);
    }

    // an empty command is refused before anything runs
    std::fs::write(
        &b,
        one("runs-c").replace(
            &format!("[\"sh\", {:?}]", script.display().to_string()),
            "[]",
        ),
    )
    .unwrap();
    let (ok, err) = mitune(&["validate", b.to_str().unwrap()]);
    assert!(
        !ok && err.contains("stages.rl.rewards") && err.contains("command is empty"),
        "{err}"
    );
}

/// `pack = true` on dpo, reward and kto: each micro-batch's sequences share rows (attention within each sequence,
/// positions restarting), with less padding and the losses of the unpacked stages (1e-5).
#[test]
fn packed_preference_stages_give_the_unpacked_losses() {
    let d = scratch("stages-pack");
    let w = world(&d);
    let r = d.join("r.toml");
    let run = |out: &str, pack: bool| {
        let mut text = recipe(&w, &d.join(out), "", "").replace(
            "pipeline = [\"align\", \"dpo\", \"rm\", \"rl\", \"ppo\"]",
            "pipeline = [\"align\", \"dpo\", \"rm\"]",
        );
        // room for several sequences per row
        text = text.replace("max_len = 256\n", "max_len = 640\n");
        if pack {
            text = text.replace("max_len = 640\n", "max_len = 640\npack = true\n");
            assert_eq!(text.matches("pack = true").count(), 2);
        }
        std::fs::write(&r, text).unwrap();
        let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
        assert!(ok, "{err}");
        let run = d.join(out).join("every");
        (lines(&run, "dpo"), lines(&run, "rm"))
    };
    let (dpo_a, rm_a) = run("plain", false);
    let (dpo_b, rm_b) = run("packed", true);
    // KTO: its examples and KL rows packed
    let kto = kto_records(&w, "");
    let kto_run = |out: &str, extra: &str| {
        let text =
            kto_recipe(&w, &d.join(out), &kto, extra).replace("max_len = 256\n", "max_len = 640\n");
        std::fs::write(&r, text).unwrap();
        let (ok, err) = mitune(&["train", r.to_str().unwrap()]);
        assert!(ok, "{err}");
        lines(&d.join(out).join("every"), "kto")
    };
    let (kto_a, kto_b) = (
        kto_run("kto-plain", ""),
        kto_run("kto-packed", "pack = true"),
    );
    assert_eq!(kto_a.len(), kto_b.len());
    for (x, y) in kto_a.iter().zip(&kto_b) {
        for k in ["loss", "kl", "rewards/chosen", "rewards/rejected"] {
            let (u, v) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!(
                (u - v).abs() < 1e-5 * (1.0 + u.abs()),
                "kto {k}: unpacked {u} vs packed {v}"
            );
        }
    }
    // the packed rows carry less padding
    let pad = |l: &[serde_json::Value]| {
        l.iter()
            .map(|x| x["padding"].as_f64().unwrap())
            .sum::<f64>()
    };
    assert!(
        pad(&dpo_b) < pad(&dpo_a),
        "padding packed {} vs unpacked {}",
        pad(&dpo_b),
        pad(&dpo_a)
    );
    for (what, a, b) in [("dpo", &dpo_a, &dpo_b), ("rm", &rm_a, &rm_b)] {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            for k in ["loss", "accuracy", "rewards/margins"] {
                if let (Some(u), Some(v)) = (x[k].as_f64(), y[k].as_f64()) {
                    assert!(
                        (u - v).abs() < 1e-5 * (1.0 + u.abs()),
                        "{what} {k}: unpacked {u} vs packed {v}"
                    );
                }
            }
        }
    }
}
