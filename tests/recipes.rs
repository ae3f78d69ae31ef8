//! Recipes: every file in recipes/ validates; each kind of mistake gives a located message (file:line and the
//! key path); inheritance and `--set` behave as documented.
use mitune::recipe;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn all_recipes(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_recipes(&p, out);
        } else if p.extension().is_some_and(|e| e == "toml") {
            out.push(p);
        }
    }
}

#[test]
fn every_recipe_validates() {
    // Paths in recipes are relative to the repository root, as users run them (cargo runs tests from there).
    let mut files = vec![];
    all_recipes(&root().join("recipes"), &mut files);
    assert!(
        files.len() >= 2,
        "recipes/ should hold the quickstart and the pretraining recipe"
    );
    for f in files {
        let rel = f.strip_prefix(root()).unwrap();
        // a sweep file validates point by point, as `mitune sweep` does before training
        let sweep = recipe::resolve::resolve(rel, &[])
            .ok()
            .and_then(|r| r.sweep);
        let points = match &sweep {
            Some(grid) => recipe::sweep::expand(grid)
                .unwrap_or_else(|e| panic!("{}: {e}", rel.display()))
                .into_iter()
                .map(|p| p.sets)
                .collect(),
            None => vec![vec![]],
        };
        for sets in points {
            let r = if sweep.is_some() {
                recipe::load_point(rel, &sets)
            } else {
                recipe::load(rel, &sets)
            };
            if let Err(errs) = r {
                panic!(
                    "{} {sets:?} does not validate:\n{}",
                    rel.display(),
                    errs.join("\n")
                );
            }
        }
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mitune-recipe-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const BASE: &str = r#"name = "t"
pipeline = ["align", "instruct"]

[model.encoder]
kind = "clip_vit"
preset = "bench-tiny"

[model.llm]
kind = "llama"
preset = "bench-tiny"
tokenizer = "."

[stages.align]
kind = "align"
data = { sources = [{ kind = "llava_json", path = "data.json" }] }
template = "plain"
batch = { global = 8, micro = 4 }
optim = { kind = "adamw", lr = 1e-3 }
max_len = 64

[stages.instruct]
kind = "instruct"
init = { from_stage = "align" }
data = { sources = [{ kind = "llava_json", path = "data.json" }] }
template = "vicuna_v1"
batch = { global = 8, micro = 4 }
optim = { kind = "adamw", lr = 2e-5 }
max_len = 64
"#;

/// Writes BASE (edited by `edit`) into a scratch dir and loads it from there.
fn load_edited(
    tag: &str,
    edit: impl Fn(&str) -> String,
    sets: &[&str],
) -> Result<recipe::schema::Recipe, Vec<String>> {
    let d = scratch(tag);
    std::fs::write(d.join("data.json"), "[]").unwrap();
    std::fs::write(d.join("r.toml"), edit(&absolute(BASE, &d))).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    recipe::load(&d.join("r.toml"), &sets).map(|(r, _)| r)
}

/// Data paths made absolute (tests run in parallel threads: no chdir).
fn absolute(base: &str, d: &Path) -> String {
    base.replace(
        "\"data.json\"",
        &format!("{:?}", d.join("data.json").display().to_string()),
    )
    .replace(
        "tokenizer = \".\"",
        &format!("tokenizer = {:?}", d.display().to_string()),
    )
}

fn one_error(r: Result<recipe::schema::Recipe, Vec<String>>) -> String {
    let errs = r.err().expect("expected an error");
    errs.join("\n")
}

#[test]
fn base_recipe_loads() {
    let r = load_edited("base", |s| s.to_string(), &[]).unwrap();
    assert_eq!(r.pipeline, ["align", "instruct"]);
}

#[test]
fn located_errors() {
    // Unknown key inside a stage's optimizer: path and line.
    let e = one_error(load_edited(
        "unknown",
        |s| s.replace("lr = 2e-5", "lr = 2e-5, lrr = 1"),
        &[],
    ));
    assert!(
        e.contains("stages.instruct.optim") && e.contains("lrr") && e.contains("r.toml:"),
        "{e}"
    );
    // Wrong type.
    let e = one_error(load_edited(
        "type",
        |s| {
            s.replace(
                "max_len = 64\n\n[stages.instruct]",
                "max_len = \"long\"\n\n[stages.instruct]",
            )
        },
        &[],
    ));
    assert!(
        e.contains("stages.align.max_len") && e.contains("r.toml:"),
        "{e}"
    );
    // Unknown kind.
    let e = one_error(load_edited(
        "kind",
        |s| s.replace("kind = \"instruct\"", "kind = \"instrukt\""),
        &[],
    ));
    assert!(
        e.contains("stages.instruct") && e.contains("instrukt"),
        "{e}"
    );
    // --set of a missing key.
    let e = one_error(load_edited(
        "set",
        |s| s.to_string(),
        &["stages.instruct.optim.lrr=1e-5"],
    ));
    assert!(e.contains("lrr") && e.contains("keys: kind, lr"), "{e}");
    // A from_stage that is not earlier in the pipeline.
    let e = one_error(load_edited(
        "from",
        |s| s.replace("from_stage = \"align\"", "from_stage = \"dpo\""),
        &[],
    ));
    assert!(
        e.contains("stages.instruct.init.from_stage") && e.contains("r.toml:23:"),
        "{e}"
    );
    // What a stage trains and at which rates is checked before it starts: a bad regex, an unknown part_lr key.
    let e = one_error(load_edited(
        "trained",
        |s| {
            s.replace("lr = 2e-5", "lr = 2e-5, part_lr = { conector = 1e-4 }")
                + "train = [\"re:llm.(layers\"]\n"
        },
        &[],
    ));
    assert!(
        e.contains("stages.instruct.optim.part_lr.conector")
            && e.contains("stages.instruct.train")
            && e.contains("not a valid regex"),
        "{e}"
    );
    // The numbers every training stage shares are checked before it starts (a zero save_every would stop it at its
    // first step, a NaN epoch count make no steps at all), each named by its key, all at once.
    let e = one_error(load_edited(
        "numbers",
        |s| {
            s.replace("lr = 2e-5", "lr = inf, betas = [0.9, 1.0]")
                + "save_every = 0\nepochs = nan\nclip_grad_norm = -1.0\nschedule = { kind = \"warmup_cosine\", warmup_ratio = 1.5 }\n"
        },
        &[],
    ));
    for k in [
        "stages.instruct.optim.lr",
        "stages.instruct.optim.betas[1]",
        "stages.instruct.save_every",
        "stages.instruct.epochs",
        "stages.instruct.clip_grad_norm",
        "stages.instruct.schedule.warmup_ratio",
    ] {
        assert!(e.contains(k), "{k} not reported: {e}");
    }
    // Several problems are all reported at once.
    let errs = load_edited(
        "many",
        |s| {
            s.replace("global = 8", "global = 7")
                .replace("template = \"plain\"", "template = \"plane\"")
        },
        &[],
    )
    .err()
    .unwrap();
    assert!(errs.len() >= 2, "{errs:?}");
}

#[test]
fn set_overrides_and_extends() {
    let r = load_edited(
        "ok-set",
        |s| s.to_string(),
        &[
            "stages.instruct.optim.lr=1e-5",
            "stages.align.batch.micro=8",
        ],
    )
    .unwrap();
    let recipe::schema::Optim::Adamw { lr, .. } = r.stages["instruct"].train().unwrap().optim;
    assert_eq!(lr, 1e-5);
    assert_eq!(r.stages["align"].train().unwrap().batch.micro, 8);
    // A child recipe changes one table; the rest is inherited.
    let d = scratch("extends");
    std::fs::write(d.join("data.json"), "[]").unwrap();
    std::fs::write(d.join("base.toml"), absolute(BASE, &d)).unwrap();
    std::fs::write(
        d.join("child.toml"),
        "extends = \"base.toml\"\nname = \"child\"\n[model.connector]\nkind = \"linear\"\n",
    )
    .unwrap();
    let (r, _) = recipe::load(&d.join("child.toml"), &[]).unwrap();
    assert_eq!(r.name, "child");
    assert_eq!(r.pipeline, ["align", "instruct"]);
    assert!(matches!(
        r.model.connector,
        Some(mitune::zoo::connectors::ConnectorSpec::Linear {})
    ));
}

/// The fine-tuning recipes for the released layouts run as shipped on the tiny models the project makes (their
/// shapes world and run directory redirected to a scratch folder; LLaVA-NeXT's two epochs cut to 3 steps), and each
/// leaves a model directory of its family.
#[test]
fn finetune_recipes_run_as_shipped() {
    for (file, family, shorten) in [
        ("recipes/finetune/qwen2-vl-lora.toml", "qwen2_vl", None),
        (
            "recipes/finetune/llava-next-lora.toml",
            "llava_next",
            Some(("epochs = 2\n", "max_steps = 3\n")),
        ),
    ] {
        let d = scratch(family);
        let mut text = std::fs::read_to_string(root().join(file)).unwrap();
        text = text.replace("datasets/shapes", &d.join("shapes").display().to_string());
        text = text.replace(
            "pipeline = [",
            &format!(
                "output = {:?}\npipeline = [",
                d.join("runs").display().to_string()
            ),
        );
        if let Some((a, b)) = shorten {
            assert!(text.contains(a), "{file}: {a:?}");
            text = text.replace(a, b);
        }
        let r = d.join("r.toml");
        std::fs::write(&r, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"))
            .args(["train", r.to_str().unwrap()])
            .current_dir(root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let runs: Vec<_> = std::fs::read_dir(d.join("runs")).unwrap().collect();
        assert_eq!(runs.len(), 1, "{file}: one run directory");
        let model = runs[0].as_ref().unwrap().path().join("lora/model");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], family, "{file}");
    }
}
