//! `mitune sweep FILE [--dry-run]`: runs every point of a sweep file's grid one after another, each in
//! `<output>/<name>/<point>/`. Every point is validated before any training; re-running the sweep skips finished
//! points and resumes an interrupted one (`train --resume` semantics per point).
//!
//! Shared prefixes: when a point's stages 0..=k resolve exactly like an earlier point's (same model, seed, data
//! preparation, held-out tasks and stage tables: `recipe::sweep::prefix_keys`), its stage directories link to that
//! point's instead of training again, e.g. a sweep over the instruct learning rate trains align once. Each point's
//! `reused.json` says which stages came from where.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::recipe::schema::{Recipe, StageSpec};
use crate::recipe::sweep::{Point, expand, prefix_keys};
use crate::stages::run::{self, Existing};

#[derive(clap::Args)]
pub struct Args {
    /// Sweep file: a recipe with a `[sweep]` grid.
    pub file: PathBuf,
    /// Print the points, their run directories and what is already done; train nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Each point's recipe (validated) and its resolved TOML.
fn points(file: &Path) -> Result<Vec<(Point, Recipe, String)>> {
    let r = crate::recipe::resolve::resolve(file, &[]).map_err(|e| Error::input(e.to_string()))?;
    let grid = r.sweep.ok_or_else(|| {
        Error::file(
            file,
            "no [sweep] table: this is a plain recipe, run it with `mitune train`",
        )
    })?;
    let pts = expand(&grid).map_err(|m| Error::file(file, m))?;
    let mut out = vec![];
    let mut problems = vec![];
    for p in pts {
        match crate::recipe::load_point(file, &p.sets) {
            Ok((mut rc, resolved)) => {
                // <output>/<sweep name>/<point>
                rc.output = rc.output.join(&rc.name);
                rc.name = p.name.clone();
                let mut table = resolved.table.clone();
                table.insert("name".into(), toml::Value::String(rc.name.clone()));
                out.push((p, rc, toml::to_string(&table).unwrap_or_default()));
            }
            Err(errs) => {
                problems.extend(errs.into_iter().map(|e| format!("point {}: {e}", p.name)))
            }
        }
    }
    if !problems.is_empty() {
        for e in &problems {
            eprintln!("error: {e}");
        }
        return Err(Error::input(format!(
            "{}: {} problem(s) in the sweep; nothing was trained",
            file.display(),
            problems.len()
        )));
    }
    Ok(out)
}

fn status(rc: &Recipe) -> String {
    let dir = rc.output.join(&rc.name);
    let done = rc
        .pipeline
        .iter()
        .filter(|s| {
            dir.join(s).join("done.json").exists() || dir.join(s).join("eval.json").exists()
        })
        .count();
    match done {
        0 if !dir.exists() => "new".into(),
        n if n == rc.pipeline.len() => "done".into(),
        n => format!("{n}/{} stages done", rc.pipeline.len()),
    }
}

/// For every point and stage, the earlier point whose run of that stage (and all before it) it reuses.
fn plan(pts: &[(Point, Recipe, String)]) -> Vec<Vec<Option<usize>>> {
    let keys: Vec<Vec<String>> = pts
        .iter()
        .map(|(_, rc, toml)| {
            let table: toml::Table = toml::from_str(toml).unwrap_or_default();
            prefix_keys(&table, &rc.pipeline)
        })
        .collect();
    (0..pts.len())
        .map(|j| {
            keys[j]
                .iter()
                .enumerate()
                .map(|(k, key)| (0..j).find(|&i| keys[i].get(k) == Some(key)))
                .collect()
        })
        .collect()
}

/// Steps a stage will run, estimated from the data files (before tokenization drops anything); None when the data
/// is not there yet or the stage is not step-based.
fn estimate(spec: &StageSpec, seed: u64) -> Option<usize> {
    let t = match spec {
        StageSpec::Align(t) | StageSpec::Instruct(t) | StageSpec::Pretrain(t) => t,
        StageSpec::Dpo(_)
        | StageSpec::Reward(_)
        | StageSpec::Grpo(_)
        | StageSpec::Ppo(_)
        | StageSpec::Kto(_)
        | StageSpec::Eval(_) => return None,
    };
    if let Some(m) = t.max_steps {
        return Some(m);
    }
    let mut n = 0.0;
    for (i, src) in t.data.sources.iter().enumerate() {
        let (good, _) = crate::data::sources::load(src, i, seed).ok()?;
        n += (crate::data::prepare::weight(src) * good.len() as f64).round();
    }
    Some((t.epochs * (n as usize / t.batch.global.max(1)) as f64).floor() as usize)
}

fn steps_of(rc: &Recipe, stage: &str) -> String {
    let spec = &rc.stages[stage];
    match spec {
        StageSpec::Eval(_) => "eval".into(),
        StageSpec::Align(_) | StageSpec::Instruct(_) | StageSpec::Pretrain(_) => {
            estimate(spec, rc.seed)
                .map(|n| format!("~{n} steps"))
                .unwrap_or_else(|| "steps: data not prepared yet".into())
        }
        StageSpec::Dpo(_)
        | StageSpec::Reward(_)
        | StageSpec::Grpo(_)
        | StageSpec::Ppo(_)
        | StageSpec::Kto(_) => "preference/RL stage".into(),
    }
}

/// Links point `j`'s stages to the earlier points' runs the plan names, while their stages are done and `j` has
/// not started that stage itself. Returns what was linked (stage -> source point).
fn link_reused(
    pts: &[(Point, Recipe, String)],
    plan: &[Vec<Option<usize>>],
    j: usize,
) -> Result<BTreeMap<String, String>> {
    let rc = &pts[j].1;
    let run = rc.output.join(&rc.name);
    let mut linked = BTreeMap::new();
    for (k, stage) in rc.pipeline.iter().enumerate() {
        let Some(i) = plan[j][k] else { break };
        let (src_point, src_rc) = (&pts[i].0, &pts[i].1);
        let src = src_rc.output.join(&src_rc.name).join(stage);
        let dst = run.join(stage);
        let done = src.join("done.json").exists() || src.join("eval.json").exists();
        if std::fs::symlink_metadata(&dst).is_ok() {
            if std::fs::read_link(&dst).is_ok() {
                linked.insert(stage.clone(), src_point.name.clone());
                continue;
            }
            break; // this point ran the stage itself
        }
        if !done {
            break;
        }
        std::fs::create_dir_all(&run).map_err(|source| Error::Io {
            path: run.clone(),
            source,
        })?;
        // relative, so the sweep folder can move
        let target = Path::new("..").join(&src_point.name).join(stage);
        symlink_dir(&target, &dst)?;
        linked.insert(stage.clone(), src_point.name.clone());
    }
    if !linked.is_empty() {
        let p = run.join("reused.json");
        std::fs::write(&p, serde_json::to_string_pretty(&linked).unwrap())
            .map_err(|source| Error::Io { path: p, source })?;
    }
    Ok(linked)
}

#[cfg(unix)]
fn symlink_dir(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).map_err(|source| Error::Io {
        path: link.to_path_buf(),
        source,
    })
}

#[cfg(windows)]
fn symlink_dir(target: &Path, link: &Path) -> Result<()> {
    std::os::windows::fs::symlink_dir(target, link).map_err(|source| Error::Io {
        path: link.to_path_buf(),
        source,
    })
}

pub fn run(a: Args) -> Result<()> {
    let pts = points(&a.file)?;
    let plan = plan(&pts);
    println!("{}: {} point(s)", a.file.display(), pts.len());
    let (mut to_run, mut reused) = (0usize, 0usize);
    for (j, (p, rc, _)) in pts.iter().enumerate() {
        println!(
            "  {:<40} {:<12} {}  {}",
            p.name,
            status(rc),
            rc.output.join(&rc.name).display(),
            p.sets.join(" ")
        );
        for (k, stage) in rc.pipeline.iter().enumerate() {
            match plan[j][k] {
                Some(i) => {
                    reused += 1;
                    println!("      {stage:<12} reuse {}", pts[i].0.name)
                }
                None => {
                    let n = steps_of(rc, stage);
                    if let Some(x) = n.strip_prefix('~').and_then(|x| x.split(' ').next()) {
                        to_run += x.parse::<usize>().unwrap_or(0);
                    }
                    println!("      {stage:<12} run ({n})")
                }
            }
        }
    }
    println!("stages reused: {reused}; training steps to run: ~{to_run}");
    if a.dry_run {
        return Ok(());
    }
    let device = crate::default_device().autodiff();
    for (j, (p, rc, toml)) in pts.iter().enumerate() {
        if status(rc) == "done" {
            eprintln!(
                "[sweep] point {}/{} {}: done, skipped",
                j + 1,
                pts.len(),
                p.name
            );
            continue;
        }
        let linked = link_reused(&pts, &plan, j)?;
        eprintln!(
            "[sweep] point {}/{} {}{}",
            j + 1,
            pts.len(),
            p.name,
            if linked.is_empty() {
                String::new()
            } else {
                format!(
                    " (reusing {})",
                    linked
                        .iter()
                        .map(|(s, from)| format!("{s} from {from}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        run::train(rc, toml, Existing::Resume, &device)?;
    }
    Ok(())
}
