//! Preference pairs as the paired stages (dpo, reward) train on them: every source loaded, both responses encoded
//! through the template with only the response supervised, the bad-sample policy applied, the step batches, and a
//! chunk of pairs as one micro-batch (its chosen responses, then its rejected ones, packed or a row each:
//! `SeqBatch`, which KTO's examples use too).
use burn::tensor::{Device, Tensor};
use std::path::Path;

use super::backward::to_input;

use super::batches::Batches;
use super::steps::Engine;
use crate::data::contract::{self, Bad};
use crate::data::loader::{MicroBatch, micro_batch_rows, pack_rows};
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

/// Sequences (each with its response supervised) as one micro-batch: a row each, or with `pack = Some(cap)` packed
/// into rows of up to `cap` tokens (first fit, as the trainer packs; positions restart and attention stays within
/// each sequence, so every sequence's numbers are its unpacked ones, with less padding). The preference stages'
/// micro-batches: DPO's and the reward model's pairs (`pairs`), KTO's examples and KL rows.
pub struct SeqBatch {
    pub mb: MicroBatch,
    /// the sequences of each row, in order
    rows: Vec<Vec<usize>>,
    /// sequences
    pub n: usize,
}

/// A chunk of m pairs as 2m sequences: sequence k < m is pair k's chosen response, m + k its rejected.
pub fn pairs(chunk: &[&EncPair], b: &Built, pack: Option<usize>) -> SeqBatch {
    let seqs: Vec<&Encoded> = chunk
        .iter()
        .map(|p| &p.0)
        .chain(chunk.iter().map(|p| &p.1))
        .collect();
    SeqBatch::new(&seqs, b, pack)
}

impl SeqBatch {
    pub fn new(seqs: &[&Encoded], b: &Built, pack: Option<usize>) -> Self {
        let n = seqs.len();
        let rows: Vec<Vec<usize>> = match pack {
            Some(cap) => {
                let len: Vec<usize> = seqs.iter().map(|s| s.ids.len()).collect();
                pack_rows(&(0..n).collect::<Vec<_>>(), &len, cap)
            }
            None => (0..n).map(|i| vec![i]).collect(),
        };
        let by_row: Vec<Vec<&Encoded>> = rows
            .iter()
            .map(|r| r.iter().map(|&i| seqs[i]).collect())
            .collect();
        let mb = micro_batch_rows(&by_row, b.text.pad_id(), &b.images, pack.is_some());
        SeqBatch { mb, rows, n }
    }

    /// The sequence that token `i` of row `r` belongs to.
    fn owner(&self, r: usize, i: usize) -> usize {
        match self.mb.segments.get(r) {
            Some(seg) => self.rows[r][(seg[i] as usize).saturating_sub(1)],
            None => self.rows[r][0],
        }
    }

    /// Summed response log-probs of each sequence [n] from final hidden states and an LM head.
    pub fn logps(&self, hidden: Tensor<3>, head: impl Fn(Tensor<3>) -> Tensor<3>) -> Tensor<1> {
        let mb = &self.mb;
        super::loss::supervised_logp_by(
            hidden,
            head,
            &mb.ids,
            &mb.labels,
            |r, i| self.owner(r, i),
            self.n,
        )
    }

    /// `logps` under a model on any device without gradients (a frozen reference's, or a policy's for KTO's KL
    /// rows).
    pub fn logps_of(&self, model: &Llava, device: &Device) -> Result<Tensor<1>> {
        let hidden = model.hidden(&to_input(&self.mb, device)?)?;
        Ok(self.logps(hidden, |h| model.language_model.logits(h)))
    }

    /// Response tokens of each sequence (at least 1) [n].
    pub fn counts(&self) -> Vec<f32> {
        let mut c = vec![0.0f32; self.n];
        for (r, labels) in self.mb.labels.iter().enumerate() {
            for (i, &l) in labels.iter().enumerate() {
                if l {
                    c[self.owner(r, i)] += 1.0;
                }
            }
        }
        c.iter().map(|&x| x.max(1.0)).collect()
    }

    /// (row, position) of each sequence's last response token [n].
    pub fn last_targets(&self) -> Vec<(usize, usize)> {
        let mut last = vec![(0, 0); self.n];
        let mut seen = vec![false; self.n];
        for (r, labels) in self.mb.labels.iter().enumerate() {
            for (i, &l) in labels.iter().enumerate() {
                if l {
                    let k = self.owner(r, i);
                    (last[k], seen[k]) = ((r, i), true);
                }
            }
        }
        // a sequence without response tokens (none: encoding refuses them) scores at its row's last token
        for k in 0..self.n {
            if !seen[k] {
                let r = self
                    .rows
                    .iter()
                    .position(|row| row.contains(&k))
                    .unwrap_or(0);
                last[k] = (r, self.mb.ids[r].len() - 1);
            }
        }
        last
    }
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
