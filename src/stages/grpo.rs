//! `kind = "grpo"`: group relative policy optimisation (Shao et al. 2024, DeepSeekMath) and its family, as TRL's
//! GRPOTrainer computes them.
//!
//! Each step: G completions per prompt sampled from the current policy (`rl::RlSetup::rollouts`, dealt over the
//! ranks of a data-parallel job), a reward per completion (rules and/or a reward model), advantages
//! Â_i = (r_i − mean(group)) / (s + 1e-4) with s the group's std (`scale_rewards = "group"`, default; unbiased,
//! as torch.std), the global batch's std (`"batch"`) or 1 with no 1e-4 (`"none"`, Dr. GRPO), then per
//! completion token
//!     ℓ_t = −min(ρ_t Â, clip(ρ_t, 1−ε, 1+ε_high) Â) + β·KL_t,   ρ_t = π(o_t)/π_old(o_t),
//!     KL_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1   (the k3 estimator, unbiased and ≥ 0),
//! with ε_high = ε unless set (DAPO's clip-higher) and, for GSPO (`importance_sampling_level = "sequence"`), one
//! ρ per completion: exp of its mean token log-ratio. The token losses are then averaged as `loss_type` says
//! (TRL's definitions, over the global batch): `grpo` each completion's token mean, then the mean over
//! completions; `bnpo` each micro-batch's token mean, averaged over the micro-batches; `dr_grpo` the token sum
//! over (completions × max_new_tokens); `dapo` the token sum over all completion tokens. π_old = the policy that
//! sampled (ρ = 1 in value at the first update; `updates` > 1 reuses the rollouts). The reference is the stage's
//! starting model. `dynamic_sampling = N` (DAPO): a group whose rewards are all equal is dropped and refilled from
//! other prompts, up to N rounds per micro-batch (`rl::RlSetup::rollouts`). Logged: reward mean/std (of the
//! sampled groups), `frac_reward_zero_std` (TRL's: the share of groups whose rewards are all equal),
//! `refill_rounds`, KL, clip fraction (TRL's: clipped where the clip binds), entropy, completion length, loss;
//! held-out greedy reward before and after the stage.
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use std::path::{Path, PathBuf};

use super::backward::{hidden_backward, to_input};
use super::loss;
use super::rl::{RlSetup, global_stats, group_stats, response_logps};
use super::steps::{self, Engine, Micro, StageRun};
use crate::data::loader::micro_batch;
use crate::data::templates::Encoded;
use crate::error::{Error, Result};
use crate::model::{Built, export};
use crate::recipe::schema::{GrpoLoss, Part, RlStage, SamplingLevel, ScaleRewards};
use crate::zoo::layers::{float_tensor, to_vec};
use crate::zoo::mllm::Llava;

/// Advantages of consecutive groups of `g` rewards: r − mean(group), divided by the group's std + 1e-4
/// (`Group`; unbiased std, as torch.std), by `batch_std` + 1e-4 (`Batch`: the unbiased std of the whole global
/// batch's rewards), or by nothing (`None`).
pub fn advantages(rewards: &[f64], g: usize, scale: ScaleRewards, batch_std: f64) -> Vec<f64> {
    rewards
        .chunks(g)
        .flat_map(|grp| {
            let n = grp.len() as f64;
            let mean = grp.iter().sum::<f64>() / n;
            let var = grp.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
            let div = match scale {
                ScaleRewards::Group => Some(var.sqrt() + 1e-4),
                ScaleRewards::Batch => Some(batch_std + 1e-4),
                ScaleRewards::None => None,
            };
            grp.iter().map(move |r| match div {
                Some(d) => (r - mean) / d,
                None => r - mean,
            })
        })
        .collect()
}

/// Group-normalised advantages (`scale_rewards = "group"`).
pub fn group_advantages(rewards: &[f64], g: usize) -> Vec<f64> {
    advantages(rewards, g, ScaleRewards::Group, 0.0)
}

/// How one micro-batch's token losses become its share of the update's loss (`loss_type`), with the counts over
/// the global batch (all ranks) that the normalisations divide by.
pub struct Norm {
    pub kind: GrpoLoss,
    /// completions in the global batch
    pub rows: usize,
    /// completion tokens in the global batch
    pub tokens: f64,
    /// micro-batches in the global batch
    pub micros: usize,
    pub max_new_tokens: usize,
}

/// The clipped surrogate's settings: ε, ε_high, where the ratio is taken, β of the KL term.
pub struct Objective {
    pub clip_low: f64,
    pub clip_high: f64,
    pub level: SamplingLevel,
    pub kl_beta: f64,
}

impl Objective {
    pub fn of(spec: &RlStage) -> Self {
        Objective {
            clip_low: spec.clip_eps,
            clip_high: spec.epsilon_high.unwrap_or(spec.clip_eps),
            level: spec.importance_sampling_level.unwrap_or_default(),
            kl_beta: spec.kl_beta,
        }
    }
}

/// The per-token losses of one micro-batch, from the policy's per-token log-probs `logp` [n, t] of the response
/// tokens (`mask` [n, t]), reduced to the micro-batch's share of the update's loss as `norm` says; also
/// [completion tokens, KL sum, clipped tokens] for the logs. `old`/`reference`: per-row log-probs over
/// positions 1..t; `adv`: one advantage per row.
#[allow(clippy::too_many_arguments)]
pub fn token_loss(
    logp: Tensor<2>,
    mask: Tensor<2>,
    adv: &[f64],
    old: Option<&[Vec<f32>]>,
    reference: Option<&[Vec<f32>]>,
    obj: &Objective,
    norm: &Norm,
    device: &Device,
) -> (Tensor<1>, [f64; 3]) {
    let [n, t] = logp.dims();
    let flat = |v: &[Vec<f32>]| -> Tensor<2> {
        let mut out = Vec::with_capacity(n * t);
        for r in v {
            out.extend(r.iter().take(t));
            out.extend(std::iter::repeat_n(0.0, t.saturating_sub(r.len())));
        }
        float_tensor(out, [n, t], device)
    };
    // One update per rollout batch: π_old is the current policy itself (ratio 1, gradient ∇log π), as TRL does,
    // so no separate forward is spent on it.
    let old = match old {
        Some(o) => flat(o),
        None => logp.clone().detach(),
    };
    let lens = mask.clone().sum_dim(1).clamp_min(1.0);
    let ratio = match obj.level {
        SamplingLevel::Token => (logp.clone() - old).exp(),
        // GSPO: exp of the completion's mean token log-ratio, the same for each of its tokens
        SamplingLevel::Sequence => (((logp.clone() - old) * mask.clone()).sum_dim(1)
            / lens.clone())
        .exp()
        .repeat_dim(1, t),
    };
    let (lo, hi) = (obj.clip_low, obj.clip_high);
    let a: Tensor<2> = float_tensor(adv.iter().map(|&x| x as f32).collect(), [n, 1], device);
    let surr = (ratio.clone() * a.clone()).min_pair(ratio.clone().clamp(1.0 - lo, 1.0 + hi) * a);
    let mut per_token = surr.neg();
    let mut kl_sum = 0.0;
    if let Some(r) = reference {
        let d = flat(r) - logp;
        let kl = d.clone().exp() - d - 1.0;
        kl_sum = to_vec(kl.clone() * mask.clone())
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
        per_token = per_token + kl.mul_scalar(obj.kl_beta);
    }
    let rv = to_vec(ratio);
    let mv = to_vec(mask.clone());
    let tokens = mv.iter().map(|&x| x as f64).sum::<f64>();
    // TRL's clip ratio: tokens whose ratio the clip holds (below 1−ε with Â < 0, above 1+ε_high with Â > 0)
    let clipped = (0..n * t)
        .filter(|&k| {
            let (r, a) = (rv[k] as f64, adv[k / t]);
            mv[k] > 0.0 && ((r < 1.0 - lo && a < 0.0) || (r > 1.0 + hi && a > 0.0))
        })
        .count() as f64;
    let masked = per_token * mask;
    let l = match norm.kind {
        // mean over each completion's tokens, summed over completions, over the global batch's completions
        GrpoLoss::Grpo => (masked.sum_dim(1) / lens)
            .sum()
            .div_scalar(norm.rows as f64),
        GrpoLoss::Bnpo => masked
            .sum()
            .div_scalar(tokens.max(1.0) * norm.micros as f64),
        GrpoLoss::DrGrpo => masked
            .sum()
            .div_scalar((norm.rows * norm.max_new_tokens) as f64),
        GrpoLoss::Dapo => masked.sum().div_scalar(norm.tokens.max(1.0)),
    };
    (l, [tokens, kl_sum, clipped])
}

/// Per-token log-probs of rows under a model without gradients: one Vec per row over positions 1..t (0 where the
/// next token is not a response token).
fn token_logps_of(
    model: &Llava,
    rows: &[&Encoded],
    b: &Built,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let mb = micro_batch(rows, b.text.pad_id(), &b.images);
    let hidden = model.hidden(&to_input(&mb, device)?)?;
    let (lp, _) = response_logps(model, hidden, &mb, false);
    let [n, t] = lp.dims();
    let v = to_vec(lp);
    Ok((0..n).map(|i| v[i * t..(i + 1) * t].to_vec()).collect())
}

pub fn run(
    ctx: StageRun,
    spec: &RlStage,
    start: Built,
    resume: Option<PathBuf>,
    run_dir: &Path,
) -> Result<Built> {
    let mut eng = Engine::new(ctx, &start.text)?;
    let device = eng.device;
    let inner = device.clone().inner();
    let mut rl = RlSetup::new(&eng, spec, &start, run_dir, &inner)?;
    let (per_epoch, total) = (rl.batches.per_epoch, rl.batches.total);
    let template = eng.template.clone();
    let train = eng.train(&[Part::Connector, Part::Llm]);
    let reference = match spec.kl_beta > 0.0 {
        true => Some(eng.frozen_copy(start.model.valid(), &train)?),
        false => None,
    };
    let policy = steps::policy(&start.model, resume.as_deref(), device)?;
    let what = format!(
        "grpo ({:?}): {} prompts x {} completions, {per_epoch} steps/epoch",
        spec.loss_type.unwrap_or_default(),
        rl.prompts.len(),
        spec.group
    );
    let mut model = eng.start(policy, total, resume.as_deref(), &train, &what)?;
    if eng.first == 0 {
        rl.heldout(&mut eng, &model.valid(), &start, 0, "before", &inner)?;
    }
    let save = |m: &Llava, out: &Path| {
        export(m, &start.text, &start.processor, Some(&template), None, out)
    };
    let scale = spec.scale_rewards.unwrap_or_default();
    let obj = Objective::of(spec);
    for step in eng.range() {
        eng.begin(step);
        // this rank's rollouts from the current policy, one entry per micro-batch of prompts
        let sampler = model.valid();
        let chunks = rl.rollouts(step, spec, &sampler, &start, &inner)?;
        let mine: Vec<f64> = chunks
            .iter()
            .flatten()
            .flat_map(|c| c.rewards.iter().copied())
            .collect();
        // over every rank's rollouts: the batch std of scale_rewards = "batch" and the count of the trained ones;
        // the logged reward mean and std of the sampled ones (before dynamic sampling replaced any group), the
        // share of their groups without signal, the refill rounds
        let (_, _, batch_std, n_rolls) = global_stats(&mine);
        let sampled: Vec<f64> = chunks
            .iter()
            .flatten()
            .flat_map(|c| c.sampled.iter().copied())
            .collect();
        let (mean, std, _, _) = global_stats(&sampled);
        let (zero_std, refills) = group_stats(&chunks, spec.group);
        let mut counts = [chunks
            .iter()
            .flatten()
            .flat_map(|c| c.rolls.iter().map(|r| r.tokens as f64))
            .sum::<f64>()];
        crate::dist::sum_f64(&mut counts, "the completion tokens' all-reduce");
        let norm = Norm {
            kind: spec.loss_type.unwrap_or_default(),
            rows: n_rolls,
            tokens: counts[0],
            micros: chunks.len(),
            max_new_tokens: spec.sampling.max_new_tokens,
        };
        // per micro-batch: rows, advantages, π_old's and the reference's per-token log-probs (no gradients)
        let mut work = vec![];
        for c in &chunks {
            let Some(c) = c else {
                work.push(None);
                continue;
            };
            let rows: Vec<&Encoded> = c.rolls.iter().map(|x| &x.row).collect();
            let adv = advantages(&c.rewards, spec.group, scale, batch_std);
            let old = match spec.updates > 1 {
                true => Some(token_logps_of(&sampler, &rows, &start, &inner)?),
                false => None,
            };
            let refs = match &reference {
                Some(r) => Some(token_logps_of(r, &rows, &start, &inner)?),
                None => None,
            };
            work.push(Some((rows, adv, old, refs)));
        }
        // [completion tokens, KL sum, clipped tokens, entropy sum] over the updates
        let mut stats = [0.0f64; 4];
        let mut step_loss = 0.0;
        let mut grad_norm = 0.0;
        for _ in 0..spec.updates {
            // each update is checked before it touches the weights
            let up = eng.accumulate(model, step, work.len(), 4, |c, m| {
                let (rows, adv, old, refs) = work[c].as_ref().ok_or_else(|| {
                    Error::input(format!(
                        "grpo: micro-batch {c} has no rollouts on this rank"
                    ))
                })?;
                let mb = micro_batch(rows, start.text.pad_id(), &start.images);
                let input = to_input(&mb, device)?;
                let tail = |hidden| -> Result<_> {
                    let (logp, ent) = response_logps(m, hidden, &mb, true);
                    let mask = loss::target_mask(&mb.labels, device);
                    let entropy = ent.map_or(0.0, |e| {
                        to_vec(e * mask.clone()).iter().map(|&x| x as f64).sum()
                    });
                    let (l, [tok, kl, clipped]) = token_loss(
                        logp,
                        mask,
                        adv,
                        old.as_deref(),
                        refs.as_deref(),
                        &obj,
                        &norm,
                        device,
                    );
                    Ok((l, vec![tok, kl, clipped, entropy]))
                };
                let ckpt = spec.checkpoint_activations;
                let (loss, grads, sums) = hidden_backward(m, m, &input, ckpt, tail)?;
                Ok(Micro { loss, grads, sums })
            })?;
            model = up.model;
            grad_norm = up.norm;
            for (a, b) in stats.iter_mut().zip(&up.sums) {
                *a += b;
            }
            step_loss += up.loss / spec.updates as f64;
        }
        eng.end(
            &model,
            step,
            step_loss,
            grad_norm,
            None,
            || {
                let toks = stats[0].max(1.0);
                serde_json::json!({
                    "loss": step_loss, "reward": mean, "reward_std": std,
                    "kl": stats[1] / toks, "clip_fraction": stats[2] / toks, "entropy": stats[3] / toks,
                    "completion_length": counts[0] / n_rolls.max(1) as f64,
                    "frac_reward_zero_std": zero_std, "refill_rounds": refills,
                })
            },
            |tmp| save(&model, tmp),
        )?;
        if eng.eval_due(step) {
            let when = format!("at step {}", step + 1);
            rl.heldout(&mut eng, &model.valid(), &start, step + 1, &when, &inner)?;
        }
    }
    rl.heldout(&mut eng, &model.valid(), &start, total, "after", &inner)?;
    let model = eng.finish_model(model, save, |_, _| Ok(()))?;
    Ok(Built { model, ..start })
}

#[cfg(test)]
mod tests {
    use super::{
        GrpoLoss, Norm, Objective, SamplingLevel, ScaleRewards, advantages, group_advantages,
        token_loss,
    };

    #[test]
    fn advantages_by_hand() {
        // group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4·0.25/3) = 0.57735 -> ±0.5/0.57745 = ±0.86588
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], 4);
        let s = (1.0f64 / 3.0).sqrt() + 1e-4;
        for (x, want) in a
            .iter()
            .zip([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0, 0.0, 0.0])
        {
            assert!((x - want).abs() < 1e-12, "{x} vs {want}");
        }
        // all equal rewards: no signal
        assert!(a[4..].iter().all(|&x| x == 0.0));
    }

    /// TRL's GRPO loss written out per token in f64 (`_compute_loss`): coef_1 = exp(log_ratio) per token, or for
    /// GSPO exp((Σ_t log_ratio·m) / max(Σ_t m, 1)) per row; coef_2 = clamp(coef_1, 1−ε, 1+ε_high);
    /// ℓ = −min(coef_1·A, coef_2·A) + β·(exp(ref − logp) − (ref − logp) − 1); then
    /// grpo: mean_i(Σ_t ℓm / max(Σ_t m, 1)), bnpo: Σ ℓm / max(Σ m, 1), dr_grpo: Σ ℓm / (n·L), dapo: Σ ℓm / T.
    #[allow(clippy::too_many_arguments)]
    fn trl_loss(
        logp: &[[f64; 3]],
        old: &[[f64; 3]],
        rf: &[[f64; 3]],
        m: &[[f64; 3]],
        adv: &[f64],
        obj: &Objective,
        kind: GrpoLoss,
        max_new: usize,
        tokens: f64,
    ) -> f64 {
        let n = logp.len();
        let mut per = vec![[0.0; 3]; n];
        for i in 0..n {
            let seq = (0..3)
                .map(|t| (logp[i][t] - old[i][t]) * m[i][t])
                .sum::<f64>()
                / m[i].iter().sum::<f64>().max(1.0);
            for t in 0..3 {
                let lr = match obj.level {
                    SamplingLevel::Token => logp[i][t] - old[i][t],
                    SamplingLevel::Sequence => seq,
                };
                let c1 = lr.exp();
                let c2 = c1.clamp(1.0 - obj.clip_low, 1.0 + obj.clip_high);
                let d = rf[i][t] - logp[i][t];
                per[i][t] = -(c1 * adv[i]).min(c2 * adv[i]) + obj.kl_beta * (d.exp() - d - 1.0);
            }
        }
        let masked: f64 = (0..n)
            .map(|i| (0..3).map(|t| per[i][t] * m[i][t]).sum::<f64>())
            .sum();
        let msum: f64 = m.iter().flatten().sum();
        match kind {
            GrpoLoss::Grpo => {
                (0..n)
                    .map(|i| {
                        (0..3).map(|t| per[i][t] * m[i][t]).sum::<f64>()
                            / m[i].iter().sum::<f64>().max(1.0)
                    })
                    .sum::<f64>()
                    / n as f64
            }
            GrpoLoss::Bnpo => masked / msum.max(1.0),
            GrpoLoss::DrGrpo => masked / (n * max_new) as f64,
            GrpoLoss::Dapo => masked / tokens,
        }
    }

    #[test]
    fn every_loss_type_and_level_follows_trl() {
        let device = burn::tensor::Device::flex();
        let logp = [[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.2]];
        // ratios e^{0.1}, e^{-0.1}, e^{-0.1}, e^{0.2}, e^{-0.5}: some inside the clip, some outside
        let old = [[-1.1, -1.9, 0.0], [-0.2, -0.9, -0.7]];
        let rf = [[-1.2, -2.1, 0.0], [-0.3, -0.6, -1.5]];
        let m = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]];
        let adv = [1.0, -0.5];
        let t = |v: &[[f64; 3]]| {
            crate::zoo::layers::float_tensor(
                v.iter().flatten().map(|&x| x as f32).collect(),
                [2, 3],
                &device,
            )
        };
        let rows = |v: &[[f64; 3]]| -> Vec<Vec<f32>> {
            v.iter()
                .map(|r| r.iter().map(|&x| x as f32).collect())
                .collect()
        };
        for level in [SamplingLevel::Token, SamplingLevel::Sequence] {
            for kind in [
                GrpoLoss::Grpo,
                GrpoLoss::Bnpo,
                GrpoLoss::DrGrpo,
                GrpoLoss::Dapo,
            ] {
                let obj = Objective {
                    clip_low: 0.2,
                    clip_high: 0.28,
                    level,
                    kl_beta: 0.04,
                };
                // one micro-batch of 2 rows; the global batch's counts as `Engine::accumulate` sees them
                let norm = Norm {
                    kind,
                    rows: 2,
                    tokens: 5.0,
                    micros: 1,
                    max_new_tokens: 4,
                };
                let (l, [tok, _, _]) = token_loss(
                    t(&logp),
                    t(&m),
                    &adv,
                    Some(&rows(&old)),
                    Some(&rows(&rf)),
                    &obj,
                    &norm,
                    &device,
                );
                let got = l.into_scalar::<f32>() as f64;
                let want = trl_loss(&logp, &old, &rf, &m, &adv, &obj, kind, 4, 5.0);
                assert_eq!(tok, 5.0);
                assert!(
                    (got - want).abs() < 1e-6 * (1.0 + want.abs()),
                    "{level:?} {kind:?}: {got} vs TRL's {want}"
                );
            }
        }
    }

    #[test]
    fn batch_and_no_scaling_of_advantages() {
        let r = [1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0];
        // scale_rewards = "none": r − group mean (Dr. GRPO)
        let a = advantages(&r, 4, ScaleRewards::None, 0.0);
        assert_eq!(a, vec![0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0, 0.0]);
        // "batch": the same centring, divided by the whole batch's std + 1e-4
        let b = advantages(&r, 4, ScaleRewards::Batch, 2.0);
        for (x, y) in b.iter().zip(&a) {
            assert!((x - y / 2.0001).abs() < 1e-12, "{b:?}");
        }
    }
}
