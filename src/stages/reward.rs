//! `kind = "reward"`: a reward model for RLHF (`reward_model::RewardModel`: the MLLM backbone with a scalar head on
//! the last response token), trained with the Bradley–Terry loss −log σ(r(chosen) − r(rejected)) on preference
//! pairs; accuracy and margin on held-out pairs at the end.
//!
//! Saved as `<stage>/model/` (the LLaVA directory of the backbone) plus `score.safetensors` (`score.weight`,
//! [1, hidden], as HF's `score` layer), which `reward_model::load` (and the PPO/GRPO stages) read back.
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use std::path::PathBuf;

use super::backward::{hidden_backward, to_input};
use super::batches::pack_cap;
use super::pairs::{self, EncPair, PrefSetup, setup};
use super::pref_loss::bradley_terry;
use super::reward_model::{self, RewardModel};
use super::steps::{Engine, Micro, StageRun};
use crate::error::Result;
use crate::model::Built;
use crate::recipe::schema::{Part, PrefStage};
use crate::zoo::layers::to_vec;

/// Rewards of a micro-batch of pairs: (chosen [m], rejected [m]).
fn pair_rewards(
    rm: &RewardModel,
    chunk: &[&EncPair],
    b: &Built,
    pack: Option<usize>,
    device: &Device,
) -> Result<(Tensor<1>, Tensor<1>)> {
    let pb = pairs::pairs(chunk, b, pack);
    let r = rm.rewards(&to_input(&pb.mb, device)?, &pb.last_targets())?;
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
    pairs: &[EncPair],
    micro: usize,
    b: &Built,
    pack: Option<usize>,
    device: &Device,
) -> Result<(usize, usize, f64)> {
    let (mut n, mut ok, mut margin) = (0, 0, 0.0);
    for chunk in pairs.chunks(micro.max(1)) {
        let chunk: Vec<&EncPair> = chunk.iter().collect();
        let (c, r) = pair_rewards(rm, &chunk, b, pack, device)?;
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
    let pack = pack_cap(spec.pack, spec.max_len, &start.model, &eng.key)?;
    let (per_epoch, total) = (batches.per_epoch, batches.total);
    let train = eng.train(&[Part::Connector, Part::Llm, Part::Head]);
    let rm = match &resume {
        Some(ck) => reward_model::load(ck, device)?.0,
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
    let ckpt = spec.checkpoint_activations;
    let save = |m: &RewardModel, out: &std::path::Path| {
        m.save(&start.text, &start.processor, &template, out)
    };
    // the held-out pairs' accuracy and margin (at the end, and every `eval_every` steps)
    let evaluate = |eng: &mut Engine, rm: &RewardModel, step: usize| -> Result<()> {
        if heldout.is_empty() {
            return Ok(());
        }
        let valid = rm.valid();
        let (n, ok, margin) = accuracy(
            &valid,
            &heldout,
            spec.batch.micro,
            &start,
            pack,
            &device.clone().inner(),
        )?;
        let a = ok as f64 / n.max(1) as f64;
        eng.note(&format!(
            "step {step}: held-out pairs: accuracy {:.1}% ({ok}/{n}), margin {:.3}",
            100.0 * a,
            margin / n.max(1) as f64
        ));
        eng.metrics.write(serde_json::json!({
            "stage": eng.name, "step": step, "heldout": true, "accuracy": a, "margin": margin / n.max(1) as f64, "n": n,
        }))?;
        Ok(())
    };
    for step in eng.range() {
        eng.begin(step);
        let batch = batches.at(step);
        let chunks: Vec<&[usize]> = batch.chunks(spec.batch.micro).collect();
        // numbers summed over the step: [pairs, correct, loss sum, margin sum]
        let up = eng.accumulate(rm, step, chunks.len(), 4, |k, rm| {
            let chunk: Vec<&EncPair> = chunks[k].iter().map(|&i| &pairs[i]).collect();
            let pb = pairs::pairs(&chunk, &start, pack);
            let input = to_input(&pb.mb, device)?;
            let last = pb.last_targets();
            let tail = |hidden| -> Result<_> {
                let (c, r) = split_pairs(rm.score_at(hidden, &last));
                let l = bradley_terry(c.clone(), r.clone());
                Ok((l.clone().sum().div_scalar(batch.len() as f64), (c, r, l)))
            };
            let (loss, grads, (c, r, l)) = hidden_backward(rm, &rm.llava, &input, ckpt, tail)?;
            let mut sums = vec![0.0f64; 4];
            for ((x, y), lv) in to_vec(c).into_iter().zip(to_vec(r)).zip(to_vec(l)) {
                sums[0] += 1.0;
                sums[1] += f64::from(u8::from(x > y));
                sums[2] += lv as f64;
                sums[3] += (x - y) as f64;
            }
            Ok(Micro { loss, grads, sums })
        })?;
        n += up.sums[0] as usize;
        ok += up.sums[1] as usize;
        lsum += up.sums[2];
        msum += up.sums[3];
        rm = up.model;
        eng.end(
            &rm,
            step,
            up.loss,
            up.norm,
            None,
            || {
                let k = n.max(1) as f64;
                let line = serde_json::json!({
                    "loss": lsum / k, "accuracy": ok as f64 / k, "margin": msum / k,
                });
                (n, ok, lsum, msum) = (0, 0, 0.0, 0.0);
                line
            },
            |tmp| save(&rm, tmp),
        )?;
        if eng.eval_due(step) {
            evaluate(&mut eng, &rm, step + 1)?;
        }
    }
    evaluate(&mut eng, &rm, total)?;
    let rm = eng.finish_model(rm, save, |_, _| Ok(()))?;
    Ok(Built {
        model: rm.llava,
        ..start
    })
}
