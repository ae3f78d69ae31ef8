//! Data parallelism over MPI (built with `--features mpi`; `.ci/run` installs Open MPI): `mpirun -n 2 mitune
//! train` of an align → instruct → dpo pipeline — both ranks on this machine over TCP loopback, the transport used between
//! machines — logs the per-step losses of one process with the same global batch, writes one run (rank 0's),
//! splits the held-out generation between the ranks with the same scores, and when one rank dies the job stops
//! naming it and `--resume` continues to the same losses.
#![cfg(feature = "mpi")]
mod common;

use common::{losses, run_mitune, scratch, world};
use std::path::Path;
use std::process::Command;

/// align (4 steps) → instruct (6 steps) → dpo (2 steps) on bench-tiny presets, 2 micro-batches per step (one
/// per rank), a checkpoint every step of the first two, held-out generation after each stage.
fn recipe(w: &Path, out: &Path) -> String {
    let heldout = format!(
        r#"
[heldout]
max_new_tokens = 4
limit = 5
tasks = [{{ name = "question", path = {:?} }}]
"#,
        w.join("vqa_heldout.json").display().to_string()
    );
    let extra = common::dpo_table(w) + &heldout;
    // the instruct stage's held-out loss every 3 steps, its micro-batches split over the ranks
    let eval = format!(
        "keep_last = 2\neval = {{ every = 3, max_samples = 6, data = {{ sources = [{{ kind = \"llava_json\", path = {:?} }}] }} }}\n",
        w.join("vqa_heldout.json").display().to_string()
    );
    common::tiny_pipeline("dp", w, out, &["align", "instruct", "dpo"], &extra).replacen(
        "keep_last = 2\n",
        &eval,
        1,
    )
}

/// The in-stage held-out losses a run logged: (stage, step, eval_loss).
fn eval_losses(run: &Path) -> Vec<(String, u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| {
            Some((
                v["stage"].as_str()?.to_string(),
                v["step"].as_u64()?,
                v.get("eval_loss")?.as_f64()?,
            ))
        })
        .collect()
}

/// `mpirun -n 2` of the mitune binary over TCP loopback; (success, stderr).
fn mpirun(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new("mpirun");
    c.args([
        "-n",
        "2",
        "--oversubscribe",
        "--mca",
        "btl",
        "tcp,self",
        "--mca",
        "btl_tcp_if_include",
        "lo",
        "--mca",
        "oob_tcp_if_include",
        "lo",
    ])
    // CI runs as root; Open MPI refuses root unless told
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .arg(env!("CARGO_BIN_EXE_mitune"))
    .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("mpirun (apt-get install openmpi-bin)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn parsed(l: &[((String, u64), String)]) -> Vec<((String, u64), f64)> {
    l.iter()
        .map(|(k, v)| (k.clone(), v.parse::<f64>().unwrap()))
        .collect()
}

/// Same steps, losses within `tol` relative; a loss near 0 (GRPO's first step: each group's advantages sum to 0,
/// so its value is rounding noise summed in another order on two ranks) within `tol` · 1e-3 absolute.
fn assert_close(got: &[((String, u64), f64)], want: &[((String, u64), f64)], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for ((kg, g), (kw, w)) in got.iter().zip(want) {
        assert_eq!(kg, kw, "{what}");
        let rel = (g - w).abs() / w.abs().max(1e-3);
        assert!(rel <= tol, "{what}: {kg:?} loss {g} vs {w} (rel {rel:.2e})");
    }
}

fn heldout(run: &Path, stage: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join(stage).join("heldout.json")).unwrap())
        .unwrap()
}

#[test]
fn two_ranks_follow_one_process_and_resume_after_a_rank_dies() {
    let d = scratch("dist");
    let w = world(&d);
    let write = |name: &str, runs: &str| {
        let f = d.join(name);
        std::fs::write(&f, recipe(&w, &d.join(runs))).unwrap();
        f
    };
    let (a, b, c) = (
        write("a.toml", "runs-a"),
        write("b.toml", "runs-b"),
        write("c.toml", "runs-c"),
    );

    // one process
    let (ok, err) = run_mitune(&["train", a.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let want = parsed(&losses(&d.join("runs-a/dp")));
    assert_eq!(
        want.len(),
        12,
        "4 align + 6 instruct + 2 dpo steps: {want:?}"
    );

    // two ranks, each with half of every global batch
    let (ok, err) = mpirun(&["train", b.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let run = d.join("runs-b/dp");
    assert_close(&parsed(&losses(&run)), &want, 1e-5, "2 ranks vs 1 process");
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .collect();
    assert_eq!(steps.len(), 12, "rank 0 alone logs each step once:\n{text}");
    for s in &steps {
        assert_eq!(s["ranks"], 2, "{s}");
        assert!(s["allreduce_bytes"].as_u64().unwrap() > 0, "{s}");
    }
    // held-out generation split over the ranks scores as one process does
    for stage in ["align", "instruct", "dpo"] {
        assert_eq!(
            heldout(&run, stage),
            heldout(&d.join("runs-a/dp"), stage),
            "{stage}"
        );
    }
    assert_eq!(heldout(&run, "align")[0]["n"], 5);
    // and so does the in-stage held-out loss (6 samples: one micro-batch of 4 on rank 0, one of 2 on rank 1)
    let (ev, ev_want) = (eval_losses(&run), eval_losses(&d.join("runs-a/dp")));
    assert_eq!(ev_want.len(), 2, "instruct steps 3 and 6: {ev_want:?}");
    assert_eq!(ev.len(), ev_want.len(), "{ev:?}");
    for (g, w) in ev.iter().zip(&ev_want) {
        assert_eq!((&g.0, g.1), (&w.0, w.1));
        assert!(
            (g.2 - w.2).abs() <= 1e-5 * w.2.abs(),
            "held-out loss {g:?} vs {w:?}"
        );
    }

    // rank 1 dies after instruct step 3: the job stops, naming it; --resume continues to the same losses
    let (ok, err) = mpirun(
        &["train", c.to_str().unwrap()],
        &[
            ("MITUNE_FAULT_ABORT_AT_STEP", "instruct:3"),
            ("MITUNE_FAULT_RANK", "1"),
        ],
    );
    assert!(!ok, "the dead rank did not stop the job");
    assert!(err.contains("rank 1"), "the message names the rank:\n{err}");
    let (ok, err) = mpirun(&["train", c.to_str().unwrap(), "--resume"], &[]);
    assert!(ok, "{err}");
    assert_close(
        &parsed(&losses(&d.join("runs-c/dp"))),
        &want,
        1e-5,
        "killed at instruct 3 and resumed on 2 ranks",
    );
}

/// A global batch that two ranks cannot share evenly is refused before training, with what to set.
#[test]
fn uneven_global_batch_is_refused_with_the_fix() {
    let d = scratch("dist-uneven");
    let w = world(&d);
    let f = d.join("r.toml");
    let text = recipe(&w, &d.join("runs")).replacen(
        "batch = { global = 8, micro = 4 }",
        "batch = { global = 8, micro = 8 }",
        1,
    );
    std::fs::write(&f, text).unwrap();
    let (ok, err) = mpirun(&["train", f.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(
        err.contains("stages.align.batch") && err.contains("set micro = 4"),
        "{err}"
    );
}

/// A rank that hangs (deadlock, stuck I/O) does not hang the job: the others' all-reduce gives up after
/// `MITUNE_COLLECTIVE_TIMEOUT` seconds and ends it with a message saying so.
#[test]
fn a_stuck_rank_ends_the_job_after_the_collective_timeout() {
    let d = scratch("dist-stuck");
    let w = world(&d);
    let f = d.join("r.toml");
    std::fs::write(&f, recipe(&w, &d.join("runs"))).unwrap();
    let t0 = std::time::Instant::now();
    let (ok, err) = mpirun(
        &["train", f.to_str().unwrap()],
        &[
            ("MITUNE_FAULT_STALL_AT_STEP", "align:2"),
            ("MITUNE_FAULT_RANK", "1"),
            ("MITUNE_COLLECTIVE_TIMEOUT", "3"),
        ],
    );
    assert!(!ok, "the job did not fail");
    assert!(
        err.contains("rank 0 of 2")
            && err.contains("waited")
            && err.contains("MITUNE_COLLECTIVE_TIMEOUT"),
        "{err}"
    );
    assert!(t0.elapsed().as_secs() < 120, "took {:?}", t0.elapsed());
}

/// GRPO and PPO deal their rollouts over the ranks: each rank samples, scores and trains on its own micro-batches
/// of prompts (here one of the two per global batch), rewards and advantage statistics are reduced over all of
/// them, and the losses follow one process's; so do the reward model's and KTO's (micro-batches of pairs and
/// examples dealt over the ranks).
#[test]
fn rl_stages_split_their_rollouts_over_two_ranks() {
    let d = scratch("dist-rl");
    let w = world(&d);
    let p = |f: &str| format!("{:?}", w.join(f).display().to_string());
    let rl = format!(
        r#"
[stages.grpo]
kind = "grpo"
data = {{ sources = [{{ path = {tr}, cap = 16 }}] }}
template = "vicuna_v1"
group = 2
rewards = [{{ kind = "exact_match" }}, {{ kind = "format", pattern = "^[a-z ]+$", weight = 0.1 }}]
loss_type = "dapo"
scale_rewards = "batch"
dynamic_sampling = 2
sampling = {{ max_new_tokens = 4 }}
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 512
log_every = 1

[stages.ppo]
kind = "ppo"
init = {{ from_stage = "align" }}
data = {{ sources = [{{ path = {tr}, cap = 8 }}] }}
template = "vicuna_v1"
group = 1
rewards = [{{ kind = "exact_match" }}, {{ kind = "format", pattern = "^[a-z]+$" }}]
updates = 2
sampling = {{ max_new_tokens = 4 }}
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 512
log_every = 1

[stages.rm]
kind = "reward"
init = {{ from_stage = "align" }}
data = {{ sources = [{{ format = "pairs", path = {pairs}, cap = 16 }}] }}
template = "vicuna_v1"
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 384
log_every = 1

[stages.kto]
kind = "kto"
init = {{ from_stage = "align" }}
data = {{ sources = [{{ format = "pairs", path = {pairs}, cap = 16 }}] }}
template = "vicuna_v1"
batch = {{ global = 8, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 2
max_len = 384
log_every = 1
"#,
        tr = p("prompts_train.jsonl"),
        pairs = p("preference_train.jsonl"),
    );
    let write = |name: &str, runs: &str| {
        let f = d.join(name);
        // the released tiny shapes checkpoints: they sample varied answers (a randomly initialised model repeats
        // its last token, and its rollouts give no gradient)
        let ck = |n: &str| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("checkpoints")
                .join(n);
            format!("{:?}", p.display().to_string())
        };
        let tok = format!(
            "tokenizer = {:?}\n",
            w.join("tokenizer").display().to_string()
        );
        let text = common::tiny_pipeline(
            "rl",
            &w,
            &d.join(runs),
            &["align", "grpo", "ppo", "rm", "kto"],
            &rl,
        )
        .replacen(
            "preset = \"bench-tiny\"",
            &format!("weights = {}", ck("shapes-vit")),
            1,
        )
        .replacen(
            "preset = \"bench-tiny\"",
            &format!("weights = {}", ck("shapes-llm")),
            1,
        )
        .replacen(&tok, "", 1);
        std::fs::write(&f, text).unwrap();
        f
    };
    let (a, b) = (write("a.toml", "runs-a"), write("b.toml", "runs-b"));
    let (ok, err) = run_mitune(&["train", a.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let want = parsed(&losses(&d.join("runs-a/rl")));
    assert_eq!(
        want.len(),
        12,
        "4 align + 2 grpo + 2 ppo + 2 reward + 2 kto steps: {want:?}"
    );
    let (ok, err) = mpirun(&["train", b.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    assert_close(
        &parsed(&losses(&d.join("runs-b/rl"))),
        &want,
        1e-5,
        "GRPO/PPO/reward/KTO on 2 ranks vs 1 process",
    );
    // the logged rollout statistics cover both ranks' rollouts
    let stats = |run: &str| -> Vec<(f64, f64)> {
        std::fs::read_to_string(d.join(run).join("rl/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("reward").is_some())
            .map(|v| {
                (
                    v["reward"].as_f64().unwrap(),
                    v["completion_length"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (one, two) = (stats("runs-a"), stats("runs-b"));
    assert_eq!(one.len(), 4, "{one:?}");
    for (x, y) in one.iter().zip(&two) {
        assert!(
            (x.0 - y.0).abs() < 1e-9 && (x.1 - y.1).abs() < 1e-9,
            "{one:?} vs {two:?}"
        );
    }
}
