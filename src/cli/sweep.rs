//! `mitune sweep FILE [--dry-run]`: runs every point of a sweep file's grid one after another, each in
//! `<output>/<name>/<point>/`. Every point is validated before any training; re-running the sweep skips finished
//! points and resumes an interrupted one (`train --resume` semantics per point).
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::recipe::sweep::{Point, expand};
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
fn points(file: &Path) -> Result<Vec<(Point, crate::recipe::schema::Recipe, String)>> {
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

fn status(rc: &crate::recipe::schema::Recipe) -> String {
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

pub fn run(a: Args) -> Result<()> {
    let pts = points(&a.file)?;
    println!("{}: {} point(s)", a.file.display(), pts.len());
    for (p, rc, _) in &pts {
        println!(
            "  {:<40} {:<12} {} [{}]  {}",
            p.name,
            status(rc),
            rc.output.join(&rc.name).display(),
            rc.pipeline.join(" -> "),
            p.sets.join(" ")
        );
    }
    if a.dry_run {
        return Ok(());
    }
    let device = crate::default_device().autodiff();
    for (i, (p, rc, toml)) in pts.iter().enumerate() {
        if status(rc) == "done" {
            eprintln!(
                "[sweep] point {}/{} {}: done, skipped",
                i + 1,
                pts.len(),
                p.name
            );
            continue;
        }
        eprintln!("[sweep] point {}/{} {}", i + 1, pts.len(), p.name);
        run::train(rc, toml, Existing::Resume, &device)?;
    }
    Ok(())
}
