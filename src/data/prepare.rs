//! From a stage's data spec to encoded samples, with every check run before the first step: records parse,
//! `<image>` markers match images, images exist (and a sample of them decode), sequences fit `max_len` without
//! cutting image tokens, every sample keeps a supervised token that decodes back to the assistant text.
//! Bad samples fail the stage or are skipped by policy — skipped ids are counted, printed and written to
//! `skipped.jsonl`, never dropped silently.
use rayon::prelude::*;
use std::path::Path;

use super::images::load_image;
use super::sources::{self, Bad, Sample};
use super::templates::{self, Encoded};
use super::tokenizer::TextProcessor;
use crate::error::{Error, Result};
use crate::recipe::schema::{Budget, DataSpec, OnBad, Source};
use crate::zoo::sizing::Sizing;

pub struct Prepared {
    pub samples: Vec<Sample>,
    pub encoded: Vec<Encoded>,
    /// Encoded indices per source, with the source's weight.
    pub by_source: Vec<(Vec<usize>, f64)>,
    pub bad: Vec<Bad>,
}

/// A source's mixture weight.
pub fn weight(s: &Source) -> f64 {
    match s {
        Source::LlavaJson { weight, .. }
        | Source::Messages { weight, .. }
        | Source::Captions { weight, .. }
        | Source::Vqa { weight, .. }
        | Source::Text { weight, .. } => *weight,
    }
}

/// The text processor a source with its own budget encodes with (`None`: the stage's).
fn source_processor(
    tp: &TextProcessor,
    budget: &Budget,
    key: &str,
) -> Result<Option<TextProcessor>> {
    if budget.is_empty() {
        return Ok(None);
    }
    let Some(Sizing::Native(n)) = &tp.sizing else {
        return Err(Error::input(format!(
            "{key}: min_pixels / max_pixels / video_min_pixels / video_max_pixels / fps / max_frames / frame_rate: \
             only a native-resolution model (Qwen2-VL) resizes images and samples clips by them; remove them"
        )));
    };
    let n = n
        .with_budget(budget)
        .map_err(|msg| Error::input(format!("{key}.{msg}")))?;
    let mut own = tp.clone();
    own.sizing = Some(Sizing::Native(n));
    Ok(Some(own))
}

/// How many decoded images to try before training (all paths are checked for existence).
const DECODE_CHECK: usize = 64;

/// Loads and encodes every sample. `key` names the recipe key in messages; `log_dir` receives skipped.jsonl.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    spec: &DataSpec,
    tp: &TextProcessor,
    template: &str,
    max_len: usize,
    seed: u64,
    policy: OnBad,
    log_dir: &Path,
    key: &str,
) -> Result<Prepared> {
    let mut samples = vec![];
    let mut bad = vec![];
    // each source counts its images' and clips' tokens under its own budget, when it sets one
    let mut tps = vec![];
    for (i, s) in spec.sources.iter().enumerate() {
        let (good, b) = sources::load(s, i, seed)
            .map_err(|e| Error::input(format!("{key}.sources[{i}]: {e}")))?;
        samples.extend(good);
        bad.extend(b);
        tps.push(source_processor(
            tp,
            &s.budget(),
            &format!("{key}.sources[{i}]"),
        )?);
    }
    let results: Vec<std::result::Result<Encoded, String>> = samples
        .par_iter()
        .enumerate()
        .map(|(i, s)| {
            if let Some(missing) = s.images.iter().find(|p| !p.is_file()) {
                return Err(format!("image {} does not exist", missing.display()));
            }
            let tp = tps[s.source].as_ref().unwrap_or(tp);
            templates::encode(tp, template, s, i, max_len)
        })
        .collect();
    let mut encoded = vec![];
    let mut by_source = vec![(vec![], 1.0); spec.sources.len()];
    for (i, s) in spec.sources.iter().enumerate() {
        by_source[i].1 = weight(s);
    }
    for (s, r) in samples.iter().zip(results) {
        match r {
            Ok(e) => {
                by_source[s.source].0.push(encoded.len());
                encoded.push(e);
            }
            Err(reason) => bad.push(Bad {
                id: s.id.clone(),
                reason,
            }),
        }
    }
    // Decode a spread sample of images (decoding every image is the training loop's job, ahead of compute).
    let mut paths: Vec<&Path> = encoded
        .iter()
        .flat_map(|e| e.images.iter().map(|p| p.as_path()))
        .collect();
    paths.dedup();
    let stride = (paths.len() / DECODE_CHECK).max(1);
    for p in paths.iter().step_by(stride).take(DECODE_CHECK) {
        load_image(p).map_err(|e| Error::input(format!("{key}: {e}")))?;
    }
    if !bad.is_empty() {
        let list: Vec<String> = bad
            .iter()
            .take(5)
            .map(|b| format!("{}: {}", b.id, b.reason))
            .collect();
        match policy {
            OnBad::Fail => {
                return Err(Error::input(format!(
                    "{key}: {} bad sample(s) (on_bad_sample = \"fail\"; set \"skip\" to drop and list them): {}",
                    bad.len(),
                    list.join("; ")
                )));
            }
            OnBad::Skip => {
                std::fs::create_dir_all(log_dir).ok();
                let p = log_dir.join("skipped.jsonl");
                let lines: String = bad
                    .iter()
                    .map(|b| serde_json::json!({"id": b.id, "reason": b.reason}).to_string() + "\n")
                    .collect();
                std::fs::write(&p, lines).map_err(|source| Error::Io {
                    path: p.clone(),
                    source,
                })?;
                eprintln!(
                    "{key}: skipped {} bad sample(s), listed in {} (first: {})",
                    bad.len(),
                    p.display(),
                    list[0]
                );
            }
        }
    }
    if encoded.is_empty() {
        return Err(Error::input(format!("{key}: no usable samples")));
    }
    Ok(Prepared {
        samples,
        encoded,
        by_source,
        bad,
    })
}
