//! `mitune train`: a recipe's pipeline, stage after stage, in `<output>/<name>/`:
//! `recipe.toml` (resolved), `metrics.jsonl`, `summary.json`, and per stage `model/` (HF layout), `checkpoints/`,
//! `heldout.json`, `done.json`. With `--resume` finished stages are skipped and the unfinished one continues from
//! its last checkpoint exactly.
use burn::tensor::Device;
use std::path::{Path, PathBuf};

use super::checkpoints;
use super::heldout::{self, Score};
use super::log::Metrics;
use super::steps::StageRun;
use super::trainer;
use crate::data::shapes;
use crate::error::{Error, Result, read_json};
use crate::model::{self, Built};
use crate::recipe::schema::{Init, Prepare, Recipe, StageSpec, Template};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    Refuse,
    Resume,
    Fresh,
}

pub fn prepare_data(rc: &Recipe) -> Result<()> {
    for p in &rc.prepare {
        match p {
            Prepare::Shapes {
                out,
                seed,
                train,
                heldout,
                vocab_size,
            } => {
                let cfg = shapes::ShapesConfig {
                    seed: *seed,
                    train: *train,
                    heldout: *heldout,
                    vocab_size: *vocab_size,
                };
                if shapes::ensure(out, &cfg)? {
                    crate::say!("generated the shapes world in {}", out.display());
                }
            }
        }
    }
    Ok(())
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: p.to_path_buf(),
        source,
    }
}

/// Held-out scores for `label`, cached in `file` so a resumed run does not recompute them.
fn heldout_row(
    rc: &Recipe,
    built: &Built,
    template: Template,
    file: &Path,
    metrics: &mut Metrics,
    label: &str,
) -> Result<Option<Vec<Score>>> {
    let Some(h) = &rc.heldout else {
        return Ok(None);
    };
    if file.exists() {
        return read_json(file).map(Some);
    }
    let src = crate::data::templates::training_source(h.template.unwrap_or(template), &built.text)
        .map_err(Error::input)?;
    let t0 = std::time::Instant::now();
    let scores = heldout::evaluate(built, h, &src)?;
    let line: Vec<String> = scores
        .iter()
        .map(|s| format!("{} {:.1}%", s.task, 100.0 * s.accuracy()))
        .collect();
    crate::say!(
        "[heldout after {label}] {} ({:.1}s)",
        line.join(", "),
        t0.elapsed().as_secs_f64()
    );
    for s in &scores {
        metrics.write(serde_json::json!({"stage": label, "heldout": s.task, "accuracy": s.accuracy(), "n": s.n}))?;
    }
    if crate::dist::writer() {
        crate::error::write_json_atomic(file, &scores)?;
    }
    Ok(Some(scores))
}

/// Runs the pipeline; returns the run directory.
pub fn train(
    rc: &Recipe,
    resolved_toml: &str,
    existing: Existing,
    device: &Device,
) -> Result<PathBuf> {
    // data parallel (`crate::dist`): rank 0 generates data and writes every file of the run; the others read what
    // it wrote once a barrier says it is there, and look at the run folder before rank 0 changes it
    let writer = crate::dist::writer();
    if writer {
        prepare_data(rc)?;
    }
    crate::dist::barrier();
    if !writer {
        prepare_data(rc)?;
    }
    let run = rc.output.join(&rc.name);
    let started = run.join("recipe.toml").exists();
    match existing {
        Existing::Refuse if started => {
            return Err(Error::file(
                &run,
                "this run already exists: pass --resume to continue it, or --fresh to delete it and start over",
            ));
        }
        Existing::Resume if started => {
            let old = std::fs::read_to_string(run.join("recipe.toml")).unwrap_or_default();
            if old != resolved_toml {
                return Err(Error::file(
                    run.join("recipe.toml"),
                    "the recipe changed since this run started; resume needs the same recipe (or use --fresh)",
                ));
            }
        }
        _ => {}
    }
    crate::dist::barrier();
    if writer {
        if existing == Existing::Fresh && run.exists() {
            std::fs::remove_dir_all(&run).map_err(io(&run))?;
        }
        std::fs::create_dir_all(&run).map_err(io(&run))?;
        crate::error::write_atomic(&run.join("recipe.toml"), resolved_toml.as_bytes())?;
    }
    crate::dist::barrier();
    if crate::dist::parallel() {
        crate::say!(
            "data parallel over {} ranks; rank 0 writes {}",
            crate::dist::world().size,
            run.display()
        );
    }
    let mut metrics = Metrics::open(&run.join("metrics.jsonl"))?;
    // Fresh components initialize from the recipe's seed, so two runs of a recipe start from the same weights.
    crate::seed(device, rc.seed);
    let mut table: Vec<(String, Vec<Score>)> = vec![];
    let mut current: Option<Built> = None;
    let clock = std::time::Instant::now();
    let mut evals: Vec<(String, Vec<crate::eval::Report>)> = vec![];
    for (i, name) in rc.pipeline.iter().enumerate() {
        let spec = &rc.stages[name];
        let dir = run.join(name);
        // Each stage draws fresh weights (adapters, heads) from its own seed (`stages.NAME.seed`, else one derived
        // from the recipe's), so a stage gives the same result whether the stages before it ran in this process,
        // were resumed, or were reused by a sweep, and a stage's seed changes its initialisation, not only its
        // data order.
        crate::seed(
            device,
            spec.seed().unwrap_or_else(|| stage_seed(rc.seed, i)),
        );
        if let StageSpec::Eval(e) = spec {
            let reports = if super::eval::is_done(&dir) {
                crate::say!(
                    "[{name}] already done; reading {}",
                    dir.join("eval.json").display()
                );
                super::eval::read(&dir)?
            } else {
                let built = init_model(rc, &run, i, e.init.as_ref(), &mut current, device)?;
                let template = e.template.unwrap_or_else(|| last_template(rc, i));
                let r = super::eval::run(name, e, &built, template, rc.seed, &dir, &mut metrics)?;
                current = Some(built);
                r
            };
            evals.push((name.clone(), reports));
            continue;
        }
        if checkpoints::is_done(&dir) {
            crate::say!("[{name}] already done; skipping");
            current = None;
            // its held-out row, as it was logged (or computed now, if the run stopped between the two)
            if rc.heldout.is_some() && generates(spec) {
                let file = dir.join("heldout.json");
                let s = if file.exists() {
                    read_json(&file).map(Some)?
                } else {
                    let b = model::load_dir(&dir.join("model"), device)?;
                    heldout_row(rc, &b, train_template(spec), &file, &mut metrics, name)?
                };
                table.extend(s.map(|s| (name.clone(), s)));
            }
            continue;
        }
        write_stage_recipe(&dir, resolved_toml)?;
        let resume = if existing == Existing::Resume {
            checkpoints::list(&dir).pop()
        } else {
            None
        };
        let mut start = match &resume {
            Some(ck) if !needs_start_on_resume(spec) => model::load_dir(ck, device)?,
            _ => init_model(rc, &run, i, spec.init(), &mut current, device)?,
        };
        if let Some(t) = spec.train() {
            start.images.set_pad_to_square(t.data.pad_to_square);
            model::stage_budget(&mut start, &t.data.budget(), &format!("stages.{name}.data"))?;
            if i == 0
                && let Some(s) = heldout_row(
                    rc,
                    &start,
                    t.template,
                    &run.join("heldout-init.json"),
                    &mut metrics,
                    "init",
                )?
            {
                table.push(("init".into(), s));
            }
        }
        let ctx = StageRun {
            name,
            spec,
            dir: dir.clone(),
            seed: rc.seed,
            device,
            metrics: &mut metrics,
        };
        let trained = run_stage(ctx, start, resume, &run)?;
        if generates(spec)
            && let Some(s) = heldout_row(
                rc,
                &trained,
                train_template(spec),
                &dir.join("heldout.json"),
                &mut metrics,
                name,
            )?
        {
            table.push((name.clone(), s));
        }
        current = Some(trained);
    }
    if !table.is_empty() && writer {
        print_table(&table);
    }
    for (name, reports) in evals.iter().filter(|_| writer) {
        println!("\n[{name}]");
        print!("{}", crate::eval::run::table(reports));
    }
    let summary = serde_json::json!({
        "name": rc.name,
        "seconds": clock.elapsed().as_secs_f64(),
        "eval": evals.iter().map(|(k, rs)| serde_json::json!({"stage": k, "tasks": rs.iter().map(|r| serde_json::json!({"name": r.name, "task": r.task, "split": r.split, "n": r.n, "shots": r.shots, "cot": r.cot, "metrics": r.metrics, "categories": r.categories})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "heldout": table.iter().map(|(k, s)| serde_json::json!({"after": k, "scores": s.iter().map(|x| serde_json::json!({"task": x.task, "accuracy": x.accuracy(), "n": x.n})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
    });
    if writer {
        crate::error::write_json_atomic(&run.join("summary.json"), &summary)?;
        eprintln!("run saved in {}", run.display());
    }
    Ok(run)
}

/// The registry of training stage kinds: the recipe's kind → the file that runs it. Every match on `StageSpec`
/// in this file is exhaustive, so a new kind that is not registered here does not compile.
fn run_stage(ctx: StageRun, start: Built, resume: Option<PathBuf>, run: &Path) -> Result<Built> {
    match ctx.spec {
        StageSpec::Align(_) | StageSpec::Instruct(_) | StageSpec::Pretrain(_) => {
            trainer::run(ctx, start, resume)
        }
        StageSpec::Dpo(p) => super::dpo::run(ctx, p, start, resume),
        StageSpec::Reward(p) => super::reward::run(ctx, p, start, resume),
        StageSpec::Grpo(g) => super::grpo::run(ctx, g, start, resume, run),
        StageSpec::Ppo(g) => super::ppo::run(ctx, g, start, resume, run),
        StageSpec::Kto(k) => super::kto::run(ctx, k, start, resume),
        StageSpec::Eval(_) => Err(Error::input(format!(
            "stages.{}: an eval stage trains nothing",
            ctx.name
        ))),
    }
}

/// Whether a resumed stage needs its starting model besides the checkpoint: the reference of DPO, GRPO, PPO and
/// KTO, and the tokenizer and processor the reward stage saves with; align/instruct/pretrain checkpoints hold all.
fn needs_start_on_resume(spec: &StageSpec) -> bool {
    match spec {
        StageSpec::Align(_) | StageSpec::Instruct(_) | StageSpec::Pretrain(_) => false,
        StageSpec::Dpo(_)
        | StageSpec::Reward(_)
        | StageSpec::Grpo(_)
        | StageSpec::Ppo(_)
        | StageSpec::Kto(_) => true,
        StageSpec::Eval(_) => false,
    }
}

/// Whether the stage's model generates (a held-out row after it): not a reward model's backbone.
fn generates(spec: &StageSpec) -> bool {
    match spec {
        StageSpec::Align(_)
        | StageSpec::Instruct(_)
        | StageSpec::Pretrain(_)
        | StageSpec::Dpo(_)
        | StageSpec::Grpo(_)
        | StageSpec::Ppo(_)
        | StageSpec::Kto(_) => true,
        StageSpec::Reward(_) | StageSpec::Eval(_) => false,
    }
}

/// The template a training stage trains with.
fn train_template(spec: &StageSpec) -> Template {
    spec.template().unwrap_or(Template::Tokenizer)
}

/// The stage's folder with the resolved recipe in it (rank 0's; the other ranks of a data-parallel job leave
/// the folder to it).
fn write_stage_recipe(dir: &Path, resolved_toml: &str) -> Result<()> {
    if !crate::dist::writer() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    crate::error::write_atomic(&dir.join("recipe.toml"), resolved_toml.as_bytes())
}

/// The device seed of stage `i`: the recipe's seed for the first stage (fresh components of the model section),
/// a different stream for each later one.
fn stage_seed(seed: u64, i: usize) -> u64 {
    seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The model a stage starts from: its `init`, else the model in hand, else the last trained stage's saved model,
/// else the `[model]` section.
fn init_model(
    rc: &Recipe,
    run: &Path,
    i: usize,
    init: Option<&Init>,
    current: &mut Option<Built>,
    device: &Device,
) -> Result<Built> {
    if let Some(init) = init {
        return match (&init.from_stage, &init.checkpoint) {
            (Some(from), _) => model::load_dir(&run.join(from).join("model"), device),
            (_, Some(ck)) => model::load_dir(ck, device),
            _ => unreachable!("validated: exactly one of from_stage/checkpoint"),
        };
    }
    if let Some(b) = current.take() {
        return Ok(b);
    }
    let prev = rc.pipeline[..i]
        .iter()
        .rev()
        .find(|n| rc.stages[n.as_str()].trains());
    match prev {
        Some(p) => model::load_dir(&run.join(p).join("model"), device),
        None => model::build(&rc.model, false, device),
    }
}

/// The template of the last training stage before stage `i` (the checkpoint's own when there is none).
fn last_template(rc: &Recipe, i: usize) -> Template {
    rc.pipeline[..i]
        .iter()
        .rev()
        .find_map(|n| rc.stages[n.as_str()].template())
        .unwrap_or(Template::Tokenizer)
}

fn print_table(table: &[(String, Vec<Score>)]) {
    let tasks: Vec<&str> = table[0].1.iter().map(|s| s.task.as_str()).collect();
    println!("\nheld-out exact match (%)");
    print!("{:<12}", "after");
    for t in &tasks {
        print!("{t:>12}");
    }
    println!();
    for (label, scores) in table {
        print!("{label:<12}");
        for s in scores {
            print!("{:>12.1}", 100.0 * s.accuracy());
        }
        println!();
    }
}
