//! `mitune report RUN_OR_SWEEP_DIR... [--out DIR]`: one table of final and best metrics per run (or sweep point)
//! with the held-out exact match after each stage,
//! as Markdown and CSV, and SVG plots of the loss and held-out-loss curves of every stage overlaid per run. A sweep
//! directory stands for its points; a stage a point reused from another (`reused.json`) is reported with the
//! other point's curves and marked.
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

mod plot;

/// One run (or sweep point) as read back from its directory.
#[derive(Debug, Default)]
pub struct Run {
    pub name: String,
    pub dir: PathBuf,
    /// the pipeline, in order
    pub stages: Vec<String>,
    /// stage -> (step, training loss)
    pub loss: BTreeMap<String, Vec<(f64, f64)>>,
    /// stage -> (step, held-out loss)
    pub eval_loss: BTreeMap<String, Vec<(f64, f64)>>,
    /// (after stage, task, accuracy) of the held-out generation table
    pub heldout: Vec<(String, String, f64)>,
    /// (stage, task name, metric, value) of evaluation stages
    pub bench: Vec<(String, String, String, f64)>,
    pub seconds: Option<f64>,
    /// stage -> point it was reused from
    pub reused: BTreeMap<String, String>,
}

fn read_lines(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::file(path, format!("line {}: not JSON: {e}", i + 1)))
        })
        .collect()
}

fn is_run(dir: &Path) -> bool {
    dir.join("metrics.jsonl").is_file()
}

/// The runs named on the command line: run directories, or sweep directories (their points, in name order).
pub fn collect(inputs: &[PathBuf]) -> Result<Vec<Run>> {
    let mut runs = vec![];
    for d in inputs {
        if is_run(d) {
            runs.push(read_run(d)?);
            continue;
        }
        let mut points: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|source| Error::Io {
                path: d.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_run(p))
            .collect();
        points.sort();
        if points.is_empty() {
            return Err(Error::file(
                d,
                "neither a run (no metrics.jsonl) nor a sweep (no point directory with metrics.jsonl)",
            ));
        }
        for p in points {
            runs.push(read_run(&p)?);
        }
    }
    Ok(runs)
}

fn read_run(dir: &Path) -> Result<Run> {
    let mut run = Run {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        dir: dir.to_path_buf(),
        ..Default::default()
    };
    if let Ok(t) = std::fs::read_to_string(dir.join("recipe.toml"))
        && let Ok(t) = t.parse::<toml::Table>()
        && let Some(p) = t.get("pipeline").and_then(|p| p.as_array())
    {
        run.stages = p
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
    }
    let reused = dir.join("reused.json");
    if reused.exists() {
        run.reused = crate::error::read_json(&reused)?;
    }
    let mut lines = read_lines(&dir.join("metrics.jsonl"))?;
    // A reused stage's curves live in the run it was reused from.
    for (stage, from) in &run.reused {
        let src = dir.parent().unwrap_or(dir).join(from).join("metrics.jsonl");
        if src.exists() {
            lines.extend(
                read_lines(&src)?
                    .into_iter()
                    .filter(|v| v["stage"].as_str() == Some(stage)),
            );
        }
    }
    for v in &lines {
        let (Some(stage), Some(step)) = (v["stage"].as_str(), v["step"].as_f64()) else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            run.loss.entry(stage.into()).or_default().push((step, l));
        }
        if let Some(l) = v["eval_loss"].as_f64() {
            run.eval_loss
                .entry(stage.into())
                .or_default()
                .push((step, l));
        }
        if !run.stages.iter().any(|s| s == stage) && stage != "init" {
            run.stages.push(stage.into());
        }
    }
    // the last line of a step wins (a resumed run rewrites the steps after its checkpoint)
    for c in run.loss.values_mut().chain(run.eval_loss.values_mut()) {
        let mut by_step: BTreeMap<u64, f64> = BTreeMap::new();
        for (s, l) in c.iter() {
            by_step.insert(*s as u64, *l);
        }
        *c = by_step.into_iter().map(|(s, l)| (s as f64, l)).collect();
    }
    let summary = dir.join("summary.json");
    if summary.exists() {
        let s: Value = crate::error::read_json(&summary)?;
        run.seconds = s["seconds"].as_f64();
        for h in s["heldout"].as_array().into_iter().flatten() {
            let after = h["after"].as_str().unwrap_or("").to_string();
            for x in h["scores"].as_array().into_iter().flatten() {
                if let (Some(t), Some(a)) = (x["task"].as_str(), x["accuracy"].as_f64()) {
                    run.heldout.push((after.clone(), t.into(), a));
                }
            }
        }
        for e in s["eval"].as_array().into_iter().flatten() {
            let stage = e["stage"].as_str().unwrap_or("").to_string();
            for t in e["tasks"].as_array().into_iter().flatten() {
                let name = t["name"].as_str().unwrap_or("").to_string();
                for (m, v) in t["metrics"].as_object().into_iter().flatten() {
                    if let Some(v) = v.as_f64() {
                        run.bench.push((stage.clone(), name.clone(), m.clone(), v));
                    }
                }
            }
        }
    }
    Ok(run)
}

/// Column name -> value, per run: the table both outputs print.
fn columns(r: &Run) -> Vec<(String, String)> {
    let mut c = vec![];
    for s in &r.stages {
        let tag = if r.reused.contains_key(s) {
            " (reused)"
        } else {
            ""
        };
        if let Some(l) = r.loss.get(s).and_then(|v| v.last()) {
            c.push((format!("{s} loss{tag}"), format!("{:.4}", l.1)));
        }
        if let Some(v) = r.eval_loss.get(s) {
            let best = v.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
            c.push((format!("{s} best held-out loss"), format!("{best:.4}")));
            c.push((
                format!("{s} final held-out loss"),
                format!("{:.4}", v.last().unwrap().1),
            ));
        }
    }
    // held-out exact match after each stage
    for (after, task, acc) in r.heldout.iter().filter(|h| h.0 != "init") {
        c.push((
            format!("{task} % after {after}"),
            format!("{:.1}", acc * 100.0),
        ));
    }
    for (stage, task, metric, v) in &r.bench {
        c.push((format!("{stage}/{task} {metric}"), format!("{v:.4}")));
    }
    if let Some(s) = r.seconds {
        c.push(("wall s".into(), format!("{s:.0}")));
    }
    c
}

/// The union of the runs' columns, in first-seen order.
fn header(rows: &[Vec<(String, String)>]) -> Vec<String> {
    let mut h: Vec<String> = vec![];
    for r in rows {
        for (k, _) in r {
            if !h.contains(k) {
                h.push(k.clone());
            }
        }
    }
    h
}

pub fn markdown(runs: &[Run]) -> String {
    let rows: Vec<_> = runs.iter().map(columns).collect();
    let h = header(&rows);
    let mut s = format!(
        "| run | {} |\n|---|{}\n",
        h.join(" | "),
        "---:|".repeat(h.len())
    );
    for (r, row) in runs.iter().zip(&rows) {
        let cells: Vec<String> = h
            .iter()
            .map(|k| {
                row.iter()
                    .find(|(c, _)| c == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| "–".into())
            })
            .collect();
        s += &format!("| {} | {} |\n", r.name, cells.join(" | "));
    }
    s
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn csv(runs: &[Run]) -> String {
    let rows: Vec<_> = runs.iter().map(columns).collect();
    let h = header(&rows);
    let mut s = std::iter::once("run".to_string())
        .chain(h.iter().cloned())
        .map(|c| csv_cell(&c))
        .collect::<Vec<_>>()
        .join(",");
    s.push('\n');
    for (r, row) in runs.iter().zip(&rows) {
        let cells: Vec<String> = std::iter::once(r.name.clone())
            .chain(h.iter().map(|k| {
                row.iter()
                    .find(|(c, _)| c == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            }))
            .map(|c| csv_cell(&c))
            .collect();
        s += &cells.join(",");
        s.push('\n');
    }
    s
}

/// Writes report.md, report.csv and one SVG per stage and curve kind into `out`; returns the files written.
pub fn write(runs: &[Run], out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut written = vec![];
    let mut stages: Vec<String> = vec![];
    for r in runs {
        for s in &r.stages {
            if !stages.contains(s) {
                stages.push(s.clone());
            }
        }
    }
    let mut md = format!("# Report: {} run(s)\n\n{}", runs.len(), markdown(runs));
    for (kind, title) in [("loss", "training loss"), ("eval_loss", "held-out loss")] {
        for s in &stages {
            let series: Vec<(String, Vec<(f64, f64)>)> = runs
                .iter()
                .filter_map(|r| {
                    let c = if kind == "loss" {
                        &r.loss
                    } else {
                        &r.eval_loss
                    };
                    c.get(s).map(|v| (r.name.clone(), v.clone()))
                })
                .filter(|(_, v)| !v.is_empty())
                .collect();
            if series.is_empty() {
                continue;
            }
            let file = out.join(format!("{kind}-{s}.svg"));
            plot::curves(&file, &format!("{s}: {title}"), title, &series)?;
            md += &format!("\n![{s} {title}]({kind}-{s}.svg)\n");
            written.push(file);
        }
    }
    for (name, text) in [("report.md", md), ("report.csv", csv(runs))] {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|source| Error::Io {
            path: p.clone(),
            source,
        })?;
        written.insert(0, p);
    }
    Ok(written)
}
