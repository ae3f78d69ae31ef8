//! Sweeps: a grid over a tiny align -> instruct recipe runs every point into its own run directory; a re-run skips
//! finished points; a sweep killed mid-point and re-run ends with the losses of an uninterrupted sweep; a key
//! that is not in the recipe is a located error before any training.
use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mitune-sweep-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn world(dir: &Path) -> PathBuf {
    let w = dir.join("shapes");
    let cfg = mitune::data::shapes::ShapesConfig {
        seed: 1,
        train: 32,
        heldout: 4,
        vocab_size: 320,
    };
    mitune::data::shapes::ensure(&w, &cfg).unwrap();
    w
}

/// A base recipe and a sweep file extending it, with runs under `out`.
fn files(d: &Path, w: &Path, out: &Path, grid: &str) -> PathBuf {
    let p = |f: &str| format!("{:?}", w.join(f).display().to_string());
    std::fs::write(
        d.join("base.toml"),
        format!(
            r#"name = "base"
seed = 3
pipeline = ["align", "instruct"]
output = {out:?}

[model.encoder]
kind = "clip_vit"
preset = "bench-tiny"
feature_layer = -1

[model.connector]
kind = "mlp"
depth = 2

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
log_every = 1

[stages.instruct]
kind = "instruct"
data = {{ sources = [{{ kind = "llava_json", path = {inst} }}] }}
template = "vicuna_v1"
batch = {{ global = 8, micro = 8 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
max_steps = 4
max_len = 384
log_every = 1
save_every = 2
"#,
            out = out.display().to_string(),
            tok = p("tokenizer"),
            cap = p("captions_train.json"),
            inst = p("instruct_train.json"),
        ),
    )
    .unwrap();
    let s = d.join("sweep.toml");
    std::fs::write(
        &s,
        format!("extends = \"base.toml\"\nname = \"abl\"\n\n[sweep]\n{grid}\n"),
    )
    .unwrap();
    s
}

fn mitune(args: &[&str], fault: Option<&str>) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mitune"));
    c.args(args);
    if let Some(f) = fault {
        c.env("MITUNE_FAULT_ABORT_AT_STEP", f);
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn losses(run: &Path) -> Vec<(String, String)> {
    let mut m = std::collections::BTreeMap::new();
    for l in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if let (Some(s), Some(k), Some(x)) =
            (v["stage"].as_str(), v["step"].as_u64(), v.get("loss"))
        {
            m.insert(format!("{s}:{k}"), x.to_string());
        }
    }
    m.into_iter().collect()
}

const GRID: &str =
    "\"stages.align.optim.lr\" = [3e-3, 1e-2]\n\"stages.instruct.optim.lr\" = [1e-3, 3e-3]";

#[test]
fn sweep_runs_points_skips_finished_and_resumes_exactly() {
    let d = scratch("run");
    let w = world(&d);
    let (a, b) = (d.join("a"), d.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let sa = files(&a, &w, &d.join("runs-a"), GRID);
    let sb = files(&b, &w, &d.join("runs-b"), GRID);
    let (ok, out, err) = mitune(&["sweep", sa.to_str().unwrap(), "--dry-run"], None);
    assert!(ok, "{err}");
    assert!(
        out.contains("4 point(s)")
            && out.contains("align.optim.lr=0.01_instruct.optim.lr=0.003")
            && out.contains("new"),
        "{out}"
    );
    assert!(!d.join("runs-a/abl").exists(), "a dry run trains nothing");
    // points differing only in the instruct lr share their align run
    assert!(
        out.contains("reuse align.optim.lr=0.003_instruct.optim.lr=0.001")
            && out.contains("stages reused: 2")
            && out.contains("run (~2 steps)")
            && out.contains("run (~4 steps)"),
        "{out}"
    );
    let (ok, _, err) = mitune(&["sweep", sa.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let names = [
        "align.optim.lr=0.003_instruct.optim.lr=0.001",
        "align.optim.lr=0.003_instruct.optim.lr=0.003",
        "align.optim.lr=0.01_instruct.optim.lr=0.001",
        "align.optim.lr=0.01_instruct.optim.lr=0.003",
    ];
    for n in names {
        assert!(
            d.join("runs-a/abl")
                .join(n)
                .join("instruct/model/config.json")
                .exists(),
            "{n}"
        );
    }
    // the points really differ
    let l = |n: &str| losses(&d.join("runs-a/abl").join(n));
    assert_ne!(l(names[0]), l(names[1]));
    assert_ne!(l(names[0]), l(names[2]));
    // point 2 linked point 1's align stage and says so
    let p2 = d.join("runs-a/abl").join(names[1]);
    assert!(
        std::fs::read_link(p2.join("align")).is_ok(),
        "align should be a link"
    );
    let reused = std::fs::read_to_string(p2.join("reused.json")).unwrap();
    assert!(reused.contains(names[0]), "{reused}");
    // ... and reusing gives the numbers recomputing gives: the same point trained on its own, align included
    let solo = d.join("runs-c");
    let (ok, _, err) = mitune(
        &[
            "train",
            a.join("base.toml").to_str().unwrap(),
            "--set",
            "stages.instruct.optim.lr=0.003",
            "--set",
            &format!("output={:?}", solo.display().to_string()),
        ],
        None,
    );
    assert!(ok, "{err}");
    let solo = losses(&solo.join("base"));
    let shared = l(names[1]);
    let aligned0: Vec<_> = l(names[0])
        .into_iter()
        .filter(|(k, _)| k.starts_with("align"))
        .collect();
    assert_eq!(solo.len(), 6, "{solo:?}");
    assert_eq!(
        &solo[..2],
        &aligned0[..],
        "align recomputed = align of the point it was reused from"
    );
    assert_eq!(
        &solo[2..],
        &shared[..],
        "instruct after a reused align = instruct after a recomputed one"
    );
    let (ok, _, err) = mitune(&["sweep", sa.to_str().unwrap()], None);
    assert!(ok && err.matches("done, skipped").count() == 4, "{err}");
    // The report: one row per point (the reused align marked), CSV, and overlaid curves per stage.
    let rep = d.join("report");
    let (ok, out, err) = mitune(
        &[
            "report",
            d.join("runs-a/abl").to_str().unwrap(),
            "--out",
            rep.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");
    let md = std::fs::read_to_string(rep.join("report.md")).unwrap();
    for n in names {
        assert!(md.contains(&format!("| {n} |")), "{md}");
    }
    assert!(
        md.contains("align loss (reused)") && md.contains("instruct loss"),
        "{md}"
    );
    assert!(out.contains("| run |"), "{out}");
    let csv = std::fs::read_to_string(rep.join("report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    // the final instruct loss in the table is the last logged one
    let last: f64 = l(names[3]).last().unwrap().1.parse().unwrap();
    assert!(csv.contains(&format!("{last:.4}")), "{csv} lacks {last:.4}");
    for f in ["loss-align.svg", "loss-instruct.svg"] {
        let svg = std::fs::read_to_string(rep.join(f)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.matches("<polyline").count() >= 4,
            "{f}"
        );
    }
    // TensorBoard event files sit beside metrics.jsonl
    let tb = std::fs::read_dir(d.join("runs-a/abl").join(names[0]))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .count();
    assert!(tb >= 1);
    // killed in the third point's instruct stage after step 3 (checkpoint at 2), then re-run
    let (ok, _, _) = mitune(&["sweep", sb.to_str().unwrap()], Some("instruct:3"));
    assert!(!ok);
    let (ok, _, err) = mitune(&["sweep", sb.to_str().unwrap()], None);
    assert!(ok, "{err}");
    for n in names {
        assert_eq!(
            losses(&d.join("runs-a/abl").join(n)),
            losses(&d.join("runs-b/abl").join(n)),
            "{n}: interrupted sweep differs"
        );
    }
}

#[test]
fn sweep_errors_come_before_training() {
    let d = scratch("errs");
    let w = world(&d);
    let s = files(
        &d,
        &w,
        &d.join("runs"),
        "\"model.connector.width\" = [1, 2]",
    );
    let (ok, _, err) = mitune(&["sweep", s.to_str().unwrap()], None);
    assert!(
        !ok && err.contains("model.connector.width") && err.contains("nothing was trained"),
        "{err}"
    );
    assert!(!d.join("runs").exists());
    let s = files(&d, &w, &d.join("runs"), "\"model.connector.depth\" = []");
    let (ok, _, err) = mitune(&["sweep", s.to_str().unwrap()], None);
    assert!(!ok && err.contains("empty axis"), "{err}");
    // a sweep file is not a recipe
    let s = files(&d, &w, &d.join("runs"), GRID);
    let (ok, _, err) = mitune(&["train", s.to_str().unwrap()], None);
    assert!(!ok && err.contains("mitune sweep"), "{err}");
}
