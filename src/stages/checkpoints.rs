//! Run-state checkpoints under `<run>/<stage>/checkpoints/step-NNNNNN/`: the model as an HF directory, the
//! optimizer moments (burnpack), the parameter ids they are keyed by, and the step. Written into a `.tmp` folder
//! and renamed, so a kill during a save never damages the last good checkpoint; only the last K are kept.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, read_json};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub total: usize,
    /// Module path -> the burn parameter id the optimizer state refers to.
    pub param_ids: BTreeMap<String, u64>,
}

pub fn optim_file(decay: bool) -> &'static str {
    if decay {
        "optim-decay.bpk"
    } else {
        "optim-nodecay.bpk"
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a checkpoint with `write` filling the temporary folder, then publishes it by renaming.
pub fn save(
    stage_dir: &Path,
    state: &TrainState,
    write: impl FnOnce(&Path) -> Result<()>,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = stage_dir.join("checkpoints");
    let dir = root.join(format!("step-{:06}", state.step));
    let tmp = root.join(format!("step-{:06}.tmp", state.step));
    // data parallel: rank 0 alone writes (every rank holds the same weights and moments)
    if !crate::dist::writer() {
        return Ok(dir);
    }
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    // a failed write (disk full, quota, read-only) leaves the last good checkpoint as it was and frees the space
    // the partial one took
    if let Err(e) =
        write(&tmp).and_then(|_| crate::error::write_json_atomic(&tmp.join("state.json"), state))
    {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    let all = list(stage_dir);
    for old in all.iter().take(all.len().saturating_sub(keep_last.max(1))) {
        std::fs::remove_dir_all(old).map_err(io(old))?;
    }
    Ok(dir)
}

/// Complete checkpoints of a stage, oldest first (unfinished `.tmp` folders are ignored).
pub fn list(stage_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(stage_dir.join("checkpoints"))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-") && !n.ends_with(".tmp"))
                        && p.join("state.json").exists()
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

pub fn read_state(ck: &Path) -> Result<TrainState> {
    read_json(&ck.join("state.json"))
}

pub fn mark_done(stage_dir: &Path, steps: usize) -> Result<()> {
    let p = stage_dir.join("done.json");
    if !crate::dist::writer() {
        return Ok(());
    }
    crate::error::write_json_atomic(&p, &serde_json::json!({ "steps": steps }))
}

pub fn is_done(stage_dir: &Path) -> bool {
    stage_dir.join("done.json").exists() && stage_dir.join("model").join("config.json").exists()
}
