//! From a stage's data spec to encoded samples, with every check run before the first step: records parse,
//! `<image>` markers match images, images exist (and a sample of them decode), sequences fit `max_len` without
//! cutting image tokens, every sample keeps a supervised token that decodes back to the assistant text.
//! Bad samples fail the stage or are skipped by policy (`data::contract`): all of them are grouped by kind in the
//! message and listed in a JSONL file, never dropped silently.
use rayon::prelude::*;
use std::path::{Path, PathBuf};

use super::contract::{self, Bad, Kind};
use super::images::load_image;
use super::sources::{self, Sample};
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

/// Every image of the sample exists and its header reads (size and format known without decoding the pixels).
fn check_media(s: &Sample) -> std::result::Result<(), Bad> {
    for p in &s.images {
        if !p.is_file() {
            return Err(Bad::new(
                s.origin.clone(),
                Kind::MissingMedia,
                format!("image {} does not exist", p.display()),
            ));
        }
        if let Err(e) = image::image_dimensions(p) {
            return Err(Bad::new(
                s.origin.clone(),
                Kind::UnreadableMedia,
                format!("image {} cannot be read: {e}", p.display()),
            ));
        }
    }
    Ok(())
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
        return Err(Error::input(crate::zoo::native::budget_needs_native(key)));
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

/// Loads and encodes every sample. `key` names the recipe key in messages; `log_dir/list` receives every bad
/// sample (JSONL) when there are any.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    spec: &DataSpec,
    tp: &TextProcessor,
    template: &str,
    max_len: usize,
    seed: u64,
    policy: OnBad,
    log_dir: &Path,
    list: &str,
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
    let results: Vec<std::result::Result<Encoded, Bad>> = samples
        .par_iter()
        .enumerate()
        .map(|(i, s)| {
            check_media(s)?;
            let tp = tps[s.source].as_ref().unwrap_or(tp);
            templates::encode(tp, template, s, i, max_len)
                .map_err(|r| Bad::new(s.origin.clone(), r.kind, r.reason))
        })
        .collect();
    let mut encoded = vec![];
    let mut origin = vec![];
    for (s, r) in samples.iter().zip(results) {
        match r {
            Ok(e) => {
                encoded.push(e);
                origin.push(s);
            }
            Err(b) => bad.push(b),
        }
    }
    // Decode a spread sample of images fully (the headers of all were read above; decoding every image is the
    // training loop's job, ahead of compute): a file that fails rejects the samples that use it.
    let mut paths: Vec<&Path> = encoded
        .iter()
        .flat_map(|e| e.images.iter().map(|p| p.as_path()))
        .collect();
    paths.sort();
    paths.dedup();
    let stride = (paths.len() / DECODE_CHECK).max(1);
    let broken: Vec<(PathBuf, String)> = paths
        .par_iter()
        .step_by(stride)
        .take(DECODE_CHECK)
        .filter_map(|p| {
            load_image(p)
                .err()
                .map(|e| (p.to_path_buf(), e.to_string()))
        })
        .collect();
    let mut kept = vec![];
    for (e, s) in encoded.into_iter().zip(origin) {
        match broken.iter().find(|(p, _)| e.images.contains(p)) {
            Some((_, why)) => bad.push(Bad::new(
                s.origin.clone(),
                Kind::UnreadableMedia,
                why.clone(),
            )),
            None => kept.push((e, s)),
        }
    }
    let mut encoded = vec![];
    let mut by_source = vec![(vec![], 1.0); spec.sources.len()];
    for (i, s) in spec.sources.iter().enumerate() {
        by_source[i].1 = weight(s);
    }
    let mut samples_kept = vec![];
    for (mut e, s) in kept {
        by_source[s.source].0.push(encoded.len());
        e.index = encoded.len();
        encoded.push(e);
        samples_kept.push(s.clone());
    }
    contract::settle(&bad, policy, &log_dir.join(list), key, "sample")?;
    if encoded.is_empty() {
        return Err(Error::input(format!("{key}: no usable samples")));
    }
    Ok(Prepared {
        samples: samples_kept,
        encoded,
        by_source,
        bad,
    })
}
