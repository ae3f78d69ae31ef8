//! Preference pairs as the paired stages (dpo, reward) train on them: every source loaded, both responses encoded
//! through the template with only the response supervised, the bad-sample policy applied, the step batches, and a
//! chunk of pairs as one micro-batch (its chosen rows, then its rejected rows).
use burn::tensor::{Device, Tensor};
use std::path::Path;

use super::backward::to_input;

use super::batches::Batches;
use super::steps::Engine;
use crate::data::contract::{self, Bad};
use crate::data::loader::{MicroBatch, micro_batch};
use crate::data::preference::{Pair, load_pairs};
use crate::data::sources::{Role, Sample};
use crate::data::templates::{self, Encoded};
use crate::data::tokenizer::TextProcessor;
use crate::error::{Error, Result};
use crate::model::Built;
use crate::recipe::schema::{OnBad, PrefData, PrefStage};
use crate::zoo::mllm::Llava;

/// An encoded pair: (chosen, rejected), both with only the response supervised.
pub type EncPair = (Encoded, Encoded);

fn sample(p: &Pair, response: &str) -> Sample {
    response_sample(&p.id, &p.images, &p.history, response)
}

/// A prompt (`history`, ending with the user turn, and its images) answered by `response`: the sample whose
/// last assistant turn alone is supervised (`templates::encode_last`). Preference pairs and KTO's examples.
pub fn response_sample(
    id: &str,
    images: &[std::path::PathBuf],
    history: &[(Role, String)],
    response: &str,
) -> Sample {
    let mut messages = history.to_vec();
    messages.push((Role::Assistant, response.to_string()));
    Sample {
        id: id.to_string(),
        origin: id.to_string(),
        source: 0,
        images: images.to_vec(),
        videos: vec![],
        messages,
        raw_text: None,
        meta: serde_json::Value::Null,
    }
}

/// Loads every source, encodes both responses, applies the bad-sample policy (every bad pair listed in `list`,
/// JSONL: `<stage>/skipped.jsonl` for the training pairs, `skipped-heldout.jsonl` for the held-out ones).
#[allow(clippy::too_many_arguments)]
pub fn load_encode(
    data: &PrefData,
    text: &TextProcessor,
    template: &str,
    max_len: usize,
    on_bad: OnBad,
    list: &Path,
    key: &str,
) -> Result<Vec<EncPair>> {
    let mut out = vec![];
    let mut bad = vec![];
    for s in &data.sources {
        let (mut pairs, b) = load_pairs(s.format, &s.path, s.images.as_deref())?;
        bad.extend(b);
        if let Some(c) = s.cap {
            pairs.truncate(c);
        }
        for (k, p) in pairs.into_iter().enumerate() {
            let i = out.len();
            let enc = |r: &str| templates::encode_last(text, template, &sample(&p, r), i, max_len);
            match (enc(&p.chosen), enc(&p.rejected)) {
                (Ok(c), Ok(r)) => out.push((c, r)),
                (Err(e), _) | (_, Err(e)) => bad.push(Bad::new(
                    format!("{}:{k} ({})", s.path.display(), p.id),
                    e.kind,
                    e.reason,
                )),
            }
        }
    }
    contract::settle(&bad, on_bad, list, key, "pair")?;
    if out.is_empty() {
        return Err(Error::input(format!("{key}: no usable pair")));
    }
    Ok(out)
}

/// A chunk's chosen rows then its rejected rows as one micro-batch of 2 × pairs (DPO and reward stages).
pub fn pair_batch(chunk: &[&EncPair], b: &Built) -> MicroBatch {
    let rows: Vec<&Encoded> = chunk
        .iter()
        .map(|p| &p.0)
        .chain(chunk.iter().map(|p| &p.1))
        .collect();
    micro_batch(&rows, b.text.pad_id(), &b.images)
}

/// What the preference stages (dpo, reward) start from: encoded train and held-out pairs, batches.
pub struct PrefSetup {
    pub pairs: Vec<EncPair>,
    pub heldout: Vec<EncPair>,
    pub batches: Batches,
}

pub fn setup(eng: &Engine, spec: &PrefStage, start: &Built) -> Result<PrefSetup> {
    // each split lists its own bad pairs (the held-out split's never overwrite the training split's)
    let load = |d: &PrefData, k: &str, list: &str| {
        load_encode(
            d,
            &start.text,
            &eng.template,
            spec.max_len,
            spec.on_bad_sample,
            &eng.dir.join(list),
            &format!("{}.{k}", eng.key),
        )
    };
    let pairs = load(&spec.data, "data", "skipped.jsonl")?;
    let heldout = match &spec.heldout {
        Some(h) => load(h, "heldout", "skipped-heldout.jsonl")?,
        None => vec![],
    };
    let batches = Batches::new(
        &eng.key,
        "pairs",
        spec.batch.global,
        eng.seed,
        pairs.iter().map(|p| !p.0.images.is_empty()).collect(),
        pairs
            .iter()
            .map(|p| p.0.ids.len().max(p.1.ids.len()))
            .collect(),
        spec.epochs,
        spec.max_steps,
    )?;
    Ok(PrefSetup {
        pairs,
        heldout,
        batches,
    })
}

/// Summed response log-probs [rows] of a micro-batch under a model on any device (a frozen reference's, or a
/// policy's without gradients): DPO's reference, KTO's reference and KL rows.
pub fn sequence_logps(model: &Llava, mb: &MicroBatch, device: &Device) -> Result<Tensor<1>> {
    let hidden = model.hidden(&to_input(mb, device)?)?;
    let head = |h| model.language_model.logits(h);
    Ok(super::loss::supervised_logp_rows(
        hidden, head, &mb.ids, &mb.labels,
    ))
}
