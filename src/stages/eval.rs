//! `kind = "eval"`: a pipeline stage that runs benchmark tasks on the model of an earlier stage, so a recipe
//! ends with its numbers. Reports go to `<stage>/eval.json` (with every prediction) and one line per task into
//! `metrics.jsonl`; a finished eval stage is read back, not recomputed, on `--resume`.
use burn::module::Module;
use std::path::Path;

use super::log::Metrics;
use crate::error::{Error, Result, read_json};
use crate::eval::{Options, Report, run_task};
use crate::model::Built;
use crate::recipe::schema::{EvalStage, Template};

pub fn is_done(dir: &Path) -> bool {
    dir.join("eval.json").exists()
}

pub fn read(dir: &Path) -> Result<Vec<Report>> {
    read_json(&dir.join("eval.json"))
}

/// Runs every task of the stage on `built` (any device; evaluated without autodiff).
pub fn run(
    name: &str,
    e: &EvalStage,
    built: &Built,
    template: Template,
    seed: u64,
    dir: &Path,
    metrics: &mut Metrics,
) -> Result<Vec<Report>> {
    let model = built.model.valid();
    let src = crate::data::templates::source(template, &built.text)
        .map_err(|m| Error::input(format!("stages.{name}.template: {m}")))?;
    let mut reports = vec![];
    for t in &e.tasks {
        let opt = Options {
            template: src.clone(),
            max_new_tokens: e.max_new_tokens.unwrap_or(if t.cot { 256 } else { 32 }),
            batch_size: e.batch_size,
            seed: e.seed.unwrap_or(seed),
            on_bad: e.on_bad_sample,
        };
        let r = run_task(&model, &built.text, &built.images, t, &opt)
            .map_err(|err| Error::input(format!("stages.{name}: task {}: {err}", t.label())))?;
        eprint!(
            "[{name}] {}",
            crate::eval::run::table(std::slice::from_ref(&r))
        );
        metrics.write(serde_json::json!({
            "stage": name, "eval": r.name, "task": r.task, "split": r.split, "n": r.n,
            "shots": r.shots, "cot": r.cot, "metrics": r.metrics, "skipped": r.skipped.len(),
            "samples_per_s": r.samples_per_s,
        }))?;
        reports.push(r);
    }
    if !crate::dist::writer() {
        return Ok(reports);
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    crate::error::write_json_atomic(&dir.join("eval.json"), &reports)?;
    Ok(reports)
}
