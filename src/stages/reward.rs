//! `kind = "reward"`: a reward model for RLHF — the MLLM backbone with a scalar head on the last response token
//! (transformers' `*ForSequenceClassification` with one label), trained with the Bradley–Terry loss
//! −log σ(r(chosen) − r(rejected)) on preference pairs; accuracy and margin on held-out pairs at the end.
//!
//! Saved as `<stage>/model/` (the LLaVA directory of the backbone) plus `score.safetensors` (`score.weight`,
//! [1, hidden], as HF's `score` layer), which `reward::load` (and the PPO/GRPO stages) read back.
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::{Module, Param};
use burn::optim::GradientsAccumulator;
use burn::tensor::{Device, Tensor};
use std::path::{Path, PathBuf};

use super::build::{self, Built, export};
use super::dpo::{PrefSetup, pair_batch, setup};
use super::pref_loss::bradley_terry;
use super::steps::Engine;
use super::trainer::{self, StageRun, to_input};
use crate::checkpoint::safetensors_io::{ToWrite, WeightStore, write_file};
use crate::data::loader::micro_batch;
use crate::data::templates::Encoded;
use crate::error::{Error, Result};
use crate::recipe::schema::{Part, PrefStage};
use crate::zoo::layers::{float_tensor, int_tensor, to_vec};
use crate::zoo::mllm::{Llava, MmInput};

pub const SCORE_FILE: &str = "score.safetensors";

#[derive(Module, Debug)]
pub struct RewardModel {
    pub llava: Llava,
    /// hidden -> 1, no bias (HF's `score`)
    pub score: Linear,
}

impl RewardModel {
    /// A fresh head (zero-initialised, so every reward starts at 0) on a backbone.
    pub fn new(llava: Llava, device: &Device) -> Self {
        let d = llava.spec.llm.hidden_size;
        let mut score = LinearConfig::new(d, 1).with_bias(false).init(device);
        score.weight = Param::from_tensor(Tensor::zeros([d, 1], device));
        RewardModel { llava, score }
    }

    /// Rewards [b]: the head on the final hidden state at `last[b]` (each row's last response token).
    pub fn rewards(&self, input: &MmInput, last: &[usize]) -> Result<Tensor<1>> {
        Ok(self.score_at(self.llava.hidden(input)?, last))
    }

    /// The head on final hidden states h [b, t, d] at `last[b]`: [b].
    fn score_at(&self, h: Tensor<3>, last: &[usize]) -> Tensor<1> {
        let [b, t, d] = h.dims();
        let idx: Vec<i64> = last
            .iter()
            .enumerate()
            .map(|(r, &k)| (r * t + k) as i64)
            .collect();
        let picked = h
            .reshape([b * t, d])
            .select(0, int_tensor(idx, [b], &self.score.weight.device()));
        self.score.forward(picked).reshape([b])
    }

    pub fn save(
        &self,
        text: &crate::data::tokenizer::TextProcessor,
        processor: &serde_json::Value,
        template: &str,
        out: &Path,
    ) -> Result<()> {
        export(&self.llava, text, processor, Some(template), None, out)?;
        let w = to_vec(self.score.weight.val()); // [d, 1] = HF's [1, d] transposed: same values
        write_file(
            &out.join(SCORE_FILE),
            &[ToWrite::f32(
                "score.weight".into(),
                vec![1, w.len()],
                &w,
                safetensors::Dtype::F32,
            )],
        )
    }
}

/// Loads a reward model saved by the reward stage.
pub fn load(dir: &Path, device: &Device) -> Result<(RewardModel, Built)> {
    let built = build::load_dir(dir, device)?;
    let p = dir.join(SCORE_FILE);
    if !p.exists() {
        return Err(Error::file(
            &p,
            "missing: not a reward model (train one with a `kind = \"reward\"` stage)",
        ));
    }
    let store = WeightStore::open_files(&[p.clone()])?;
    let w = store.get("score.weight")?;
    let d = built.model.spec.llm.hidden_size;
    if w.shape != [1, d] {
        return Err(Error::key(
            &p,
            "score.weight",
            format!("shape {:?}, expected [1, {d}]", w.shape),
        ));
    }
    let mut rm = RewardModel::new(built.model.clone(), device);
    rm.score.weight = Param::from_tensor(float_tensor(w.values, [d, 1], device));
    Ok((rm, built))
}

/// Index of each row's last supervised token (the end of the response).
fn last_targets(labels: &[Vec<bool>]) -> Vec<usize> {
    labels
        .iter()
        .map(|r| r.iter().rposition(|&l| l).unwrap_or(r.len() - 1))
        .collect()
}

/// Rewards of a micro-batch of pairs: (chosen [m], rejected [m]).
fn pair_rewards(
    rm: &RewardModel,
    chunk: &[&(Encoded, Encoded)],
    b: &Built,
    device: &Device,
) -> Result<(Tensor<1>, Tensor<1>)> {
    let mb = pair_batch(chunk, b);
    let r = rm.rewards(&to_input(&mb, device)?, &last_targets(&mb.labels))?;
    Ok(split_pairs(r))
}

/// Rewards of 2m rows -> (chosen [m], rejected [m]).
fn split_pairs(r: Tensor<1>) -> (Tensor<1>, Tensor<1>) {
    let m = r.dims()[0] / 2;
    (r.clone().slice([0..m]), r.slice([m..2 * m]))
}

/// (pairs, correct, summed margin) of the model on `pairs`.
fn accuracy(
    rm: &RewardModel,
    pairs: &[(Encoded, Encoded)],
    micro: usize,
    b: &Built,
    device: &Device,
) -> Result<(usize, usize, f64)> {
    let (mut n, mut ok, mut margin) = (0, 0, 0.0);
    for chunk in pairs.chunks(micro.max(1)) {
        let chunk: Vec<&(Encoded, Encoded)> = chunk.iter().collect();
        let (c, r) = pair_rewards(rm, &chunk, b, device)?;
        for (x, y) in to_vec(c).into_iter().zip(to_vec(r)) {
            n += 1;
            ok += usize::from(x > y);
            margin += (x - y) as f64;
        }
    }
    Ok((n, ok, margin))
}

/// Trains the reward model from `start`'s weights (a fresh zero head), or resumes it from a checkpoint.
pub fn run(
    ctx: StageRun,
    spec: &PrefStage,
    start: Built,
    resume: Option<PathBuf>,
) -> Result<Built> {
    let mut eng = Engine::new(ctx, &start.text)?;
    let device = eng.device;
    let PrefSetup {
        pairs,
        heldout,
        mut batches,
    } = setup(&eng, spec, &start)?;
    let (per_epoch, total) = (batches.per_epoch, batches.total);
    let train = eng.train(&[Part::Connector, Part::Llm, Part::Head]);
    let rm = match &resume {
        Some(ck) => load(ck, device)?.0,
        None => RewardModel::new(start.model.clone(), device),
    };
    let mut rm = eng.start(
        rm,
        total,
        resume.as_deref(),
        &train,
        &format!("reward: {} pairs, {per_epoch} steps/epoch", pairs.len()),
    )?;
    let template = eng.template.clone();
    let (mut n, mut ok, mut lsum, mut msum) = (0usize, 0usize, 0.0f64, 0.0f64);
    for step in eng.range() {
        eng.begin(step);
        let batch = batches.at(step);
        let mut acc = GradientsAccumulator::<RewardModel>::new();
        // [loss, pairs, correct, loss sum, margin sum] of this step; data parallel: each rank takes every N-th
        // micro-batch (`crate::dist`) and the sums are summed over the ranks
        let mut s = [0.0f64; 5];
        let chunks: Vec<&[usize]> = batch.chunks(spec.batch.micro).collect();
        for chunk in crate::dist::shard(chunks.len()).map(|k| chunks[k]) {
            let chunk: Vec<&(Encoded, Encoded)> = chunk.iter().map(|&i| &pairs[i]).collect();
            let mb = pair_batch(&chunk, &start);
            let input = to_input(&mb, device)?;
            let last = last_targets(&mb.labels);
            let tail = |hidden| -> Result<_> {
                let (c, r) = split_pairs(rm.score_at(hidden, &last));
                let l = bradley_terry(c.clone(), r.clone());
                Ok((l.clone().sum().div_scalar(batch.len() as f64), (c, r, l)))
            };
            let ckpt = spec.checkpoint_activations;
            let (v, g, (c, r, l)) = trainer::hidden_backward(&rm, &rm.llava, &input, ckpt, tail)?;
            for ((x, y), lv) in to_vec(c).into_iter().zip(to_vec(r)).zip(to_vec(l)) {
                s[1] += 1.0;
                s[2] += f64::from(u8::from(x > y));
                s[3] += lv as f64;
                s[4] += (x - y) as f64;
            }
            s[0] += v;
            acc.accumulate(&rm, g);
        }
        let grads = eng.all_reduce(&rm, acc.grads(), &mut s);
        let step_loss = s[0];
        n += s[1] as usize;
        ok += s[2] as usize;
        lsum += s[3];
        msum += s[4];
        let norm;
        (rm, norm) = eng.update(rm, step, step_loss, grads)?;
        eng.end(
            &rm,
            step,
            step_loss,
            norm,
            None,
            || {
                let k = n.max(1) as f64;
                let line = serde_json::json!({
                    "loss": lsum / k, "accuracy": ok as f64 / k, "margin": msum / k,
                });
                (n, ok, lsum, msum) = (0, 0, 0.0, 0.0);
                line
            },
            |tmp| rm.save(&start.text, &start.processor, &template, tmp),
        )?;
    }
    if !heldout.is_empty() {
        let valid = rm.valid();
        let (n, ok, margin) = accuracy(
            &valid,
            &heldout,
            spec.batch.micro,
            &start,
            &device.clone().inner(),
        )?;
        let a = ok as f64 / n.max(1) as f64;
        eng.note(&format!(
            "held-out pairs: accuracy {:.1}% ({ok}/{n}), margin {:.3}",
            100.0 * a,
            margin / n.max(1) as f64
        ));
        eng.metrics.write(serde_json::json!({
            "stage": eng.name, "step": total, "heldout": true, "accuracy": a, "margin": margin / n.max(1) as f64, "n": n,
        }))?;
    }
    eng.finish(|dir| rm.save(&start.text, &start.processor, &template, &dir.join("model")))?;
    Ok(Built {
        model: rm.llava,
        ..start
    })
}

/// Scores responses with a reward model: `rows` already encoded (response supervised), rewards [n].
pub fn score(rm: &RewardModel, rows: &[&Encoded], b: &Built, device: &Device) -> Result<Vec<f32>> {
    let mb = micro_batch(rows, b.text.pad_id(), &b.images);
    Ok(to_vec(rm.rewards(
        &to_input(&mb, device)?,
        &last_targets(&mb.labels),
    )?))
}
