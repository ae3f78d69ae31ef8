//! `kind = "grpo"`: group relative policy optimisation (Shao et al. 2024, DeepSeekMath), as TRL's GRPOTrainer.
//!
//! Each step: G completions per prompt sampled from the current policy (`rollout`), a reward per completion
//! (rules and/or a reward model), advantages normalised within each prompt's group
//! Â_i = (r_i − mean(r)) / (std(r) + 1e-4) (std unbiased, as torch.std), then per completion token
//!     ℓ_t = −[ min(ρ_t Â, clip(ρ_t, 1−ε, 1+ε) Â) − β·KL_t ],   ρ_t = π(o_t)/π_old(o_t),
//!     KL_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1   (the k3 estimator, unbiased and ≥ 0),
//! averaged over each completion's tokens, then over completions. π_old = the policy that sampled (ρ = 1 in
//! value at the first update; `updates` > 1 reuses the rollouts). The reference is the stage's starting model.
//! Logged: reward mean/std, KL, clip fraction, entropy, completion length, loss; held-out greedy reward before
//! and after the stage.
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use std::path::{Path, PathBuf};

use super::build::{Built, export};
use super::loss;
use super::reward::{self, RewardModel};
use super::rollout::{self, RewardSpec, Rollout};
use super::steps::{self, Batches, Engine};
use super::trainer::{StageRun, to_input};
use crate::data::contract;
use crate::data::loader::{MicroBatch, micro_batch};
use crate::data::preference::{PromptItem, load_prompts};
use crate::data::templates::Encoded;
use crate::error::{Error, Result};
use crate::generate::GenConfig;
use crate::recipe::schema::{OnBad, Part, PromptData, RlStage};
use crate::zoo::layers::{float_tensor, to_vec};
use crate::zoo::mllm::Llava;

/// Group-normalised advantages: (r − mean) / (std + 1e-4) within consecutive groups of `g` (unbiased std).
pub fn group_advantages(rewards: &[f64], g: usize) -> Vec<f64> {
    rewards
        .chunks(g)
        .flat_map(|grp| {
            let n = grp.len() as f64;
            let mean = grp.iter().sum::<f64>() / n;
            let var = grp.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
            grp.iter().map(move |r| (r - mean) / (var.sqrt() + 1e-4))
        })
        .collect()
}

/// Loads prompts and applies the bad-sample policy.
/// `list`: where every bad prompt is written (JSONL).
pub fn load_data(
    data: &PromptData,
    on_bad: OnBad,
    list: &Path,
    key: &str,
) -> Result<Vec<PromptItem>> {
    let mut out = vec![];
    let mut bad = vec![];
    for s in &data.sources {
        let (mut p, b) = load_prompts(&s.path, s.images.as_deref())?;
        bad.extend(b);
        if let Some(c) = s.cap {
            p.truncate(c);
        }
        out.extend(p);
    }
    contract::settle(&bad, on_bad, list, key, "prompt")?;
    if out.is_empty() {
        return Err(Error::input(format!("{key}: no usable prompt")));
    }
    Ok(out)
}

/// The reward models a stage names, loaded once: (term index, model).
pub fn reward_models(
    specs: &[RewardSpec],
    run: &Path,
    device: &Device,
) -> Result<Vec<(usize, RewardModel, Built)>> {
    let mut out = vec![];
    for (j, s) in specs.iter().enumerate() {
        if let RewardSpec::Model {
            from_stage, path, ..
        } = s
        {
            let dir = match (from_stage, path) {
                (Some(st), _) => run.join(st).join("model"),
                (_, Some(p)) => p.clone(),
                _ => return Err(Error::input("a model reward needs from_stage or path")),
            };
            let (rm, b) = reward::load(&dir, device)?;
            out.push((j, rm, b));
        }
    }
    Ok(out)
}

/// Weighted reward of every rollout.
pub fn rewards(
    specs: &[RewardSpec],
    models: &[(usize, RewardModel, Built)],
    rolls: &[Rollout],
    prompts: &[PromptItem],
    device: &Device,
) -> Result<Vec<f64>> {
    let mut total = vec![0.0; rolls.len()];
    for (j, s) in specs.iter().enumerate() {
        if let Some((_, rm, b)) = models.iter().find(|m| m.0 == j) {
            let rows: Vec<&Encoded> = rolls.iter().map(|r| &r.row).collect();
            for (k, chunk) in rows.chunks(16).enumerate() {
                for (i, v) in reward::score(rm, chunk, b, device)?.into_iter().enumerate() {
                    total[k * 16 + i] += s.weight() * v as f64;
                }
            }
            continue;
        }
        for (i, r) in rolls.iter().enumerate() {
            let v = s
                .rule(&r.text, prompts[r.prompt].answer.as_deref())?
                .unwrap_or(0.0);
            total[i] += s.weight() * v;
        }
    }
    Ok(total)
}

/// Mean greedy reward on held-out prompts (rule terms only).
pub fn heldout_reward(
    model: &Llava,
    b: &Built,
    template: &str,
    items: &[PromptItem],
    specs: &[RewardSpec],
    max_new: usize,
    device: &Device,
) -> Result<f64> {
    let ids: Vec<Vec<i64>> = items
        .iter()
        .map(|p| rollout::encode_prompt(b, template, p).map_err(Error::input))
        .collect::<Result<_>>()?;
    let cfg = GenConfig::greedy(max_new, crate::generate::stop_ids(model, &b.text));
    let mut sum = 0.0;
    for chunk in (0..items.len()).collect::<Vec<_>>().chunks(16) {
        let rolls = rollout::sample(model, b, items, &ids, chunk, 1, &cfg, 0, device)?;
        for r in &rolls {
            for s in specs {
                sum += s.weight()
                    * s.rule(&r.text, items[r.prompt].answer.as_deref())?
                        .unwrap_or(0.0);
            }
        }
    }
    Ok(sum / items.len().max(1) as f64)
}

#[derive(Default)]
struct Stats {
    tokens: f64,
    kl: f64,
    clipped: f64,
    entropy: f64,
}

/// Loss of one micro-batch of rollouts (summed over completions; the caller divides by the batch's count).
#[allow(clippy::too_many_arguments)]
fn micro_loss(
    policy: &Llava,
    rows: &[&Encoded],
    adv: &[f64],
    old: Option<&[Vec<f32>]>,
    reference: Option<&[Vec<f32>]>,
    spec: &RlStage,
    b: &Built,
    device: &Device,
    stats: &mut Stats,
) -> Result<Tensor<1>> {
    let mb = micro_batch(rows, b.text.pad_id(), &b.images);
    let hidden = policy.hidden(&to_input(&mb, device)?)?;
    let (logp, ent) = response_logps(policy, hidden, &mb, true);
    let [n, t] = logp.dims();
    let mask = loss::target_mask(&mb.labels, device);
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
    let ratio = (logp.clone() - old).exp();
    let a: Tensor<2> = float_tensor(adv.iter().map(|&x| x as f32).collect(), [n, 1], device);
    let surr = (ratio.clone() * a.clone()).min_pair(
        ratio
            .clone()
            .clamp(1.0 - spec.clip_eps, 1.0 + spec.clip_eps)
            * a,
    );
    let mut per_token = surr.neg();
    if let Some(r) = reference {
        let d = flat(r) - logp.clone();
        let kl = d.clone().exp() - d - 1.0;
        stats.kl += to_vec(kl.clone() * mask.clone())
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
        per_token = per_token + kl.mul_scalar(spec.kl_beta);
    }
    let rv = to_vec(ratio);
    let mv = to_vec(mask.clone());
    stats.tokens += mv.iter().map(|&x| x as f64).sum::<f64>();
    stats.clipped += rv
        .iter()
        .zip(&mv)
        .filter(|(r, m)| {
            **m > 0.0 && ((**r as f64) < 1.0 - spec.clip_eps || (**r as f64) > 1.0 + spec.clip_eps)
        })
        .count() as f64;
    if let Some(e) = ent {
        stats.entropy += to_vec(e * mask.clone())
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
    }
    // mean over each completion's tokens, summed over completions
    let lens = mask.clone().sum_dim(1).clamp_min(1.0);
    Ok(((per_token * mask).sum_dim(1) / lens).sum())
}

/// Per-token log-probs [b, t-1] (and entropies) of a micro-batch's response tokens from `model`'s final hidden
/// states, the LM head on those positions only; 0 elsewhere (every use masks to the response). GRPO and PPO.
pub(super) fn response_logps(
    model: &Llava,
    hidden: Tensor<3>,
    mb: &MicroBatch,
    entropy: bool,
) -> (Tensor<2>, Option<Tensor<2>>) {
    let head = |h| model.language_model.logits(h);
    loss::supervised_token_logps(hidden, head, &mb.ids, &mb.labels, entropy)
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

/// What the RL stages (grpo, ppo) share: prompts encoded through the template, held-out prompts, the step
/// batches, reward models, the sampler settings.
pub struct RlSetup {
    pub template: String,
    pub prompts: Vec<PromptItem>,
    pub prompt_ids: Vec<Vec<i64>>,
    pub held: Vec<PromptItem>,
    pub batches: Batches,
    pub models: Vec<(usize, RewardModel, Built)>,
    /// The rule terms (held-out scoring uses only these).
    pub rules: Vec<RewardSpec>,
    pub cfg: GenConfig,
}

impl RlSetup {
    /// Reads the stage's prompts with the engine's template and seed; `run_dir` holds the reward models'
    /// stages.
    pub fn new(
        eng: &Engine,
        spec: &RlStage,
        start: &Built,
        run_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        let (key, dir, seed) = (&eng.key, &eng.dir, eng.seed);
        let template = eng.template.clone();
        let prompts = load_data(
            &spec.data,
            spec.on_bad_sample,
            &dir.join("skipped.jsonl"),
            &format!("{key}.data"),
        )?;
        let held = match &spec.heldout {
            Some(h) => load_data(
                h,
                spec.on_bad_sample,
                &dir.join("skipped-heldout.jsonl"),
                &format!("{key}.heldout"),
            )?,
            None => vec![],
        };
        let prompt_ids: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| {
                rollout::encode_prompt(start, &template, p)
                    .map_err(|m| Error::input(format!("{key}.data: prompt {}: {m}", p.id)))
            })
            .collect::<Result<_>>()?;
        let max_new = spec.sampling.max_new_tokens;
        if let Some(i) = prompt_ids
            .iter()
            .position(|ids| ids.len() + max_new > spec.max_len)
        {
            return Err(Error::input(format!(
                "{key}: prompt {} has {} tokens; with max_new_tokens {max_new} it exceeds max_len {}",
                prompts[i].id,
                prompt_ids[i].len(),
                spec.max_len
            )));
        }
        let batches = Batches::new(
            key,
            "prompts",
            spec.batch.global,
            seed,
            prompts.iter().map(|p| !p.images.is_empty()).collect(),
            prompt_ids.iter().map(Vec::len).collect(),
            spec.epochs,
            spec.max_steps,
        )?;
        let mut cfg = GenConfig::greedy(
            max_new,
            crate::generate::stop_ids(&start.model, &start.text),
        );
        cfg.temperature = spec.sampling.temperature;
        cfg.top_p = spec.sampling.top_p;
        cfg.top_k = spec.sampling.top_k;
        cfg.seed = seed;
        Ok(RlSetup {
            template,
            prompts,
            prompt_ids,
            held,
            batches,
            models: reward_models(&spec.rewards, run_dir, device)?,
            rules: spec
                .rewards
                .iter()
                .filter(|r| !matches!(r, RewardSpec::Model { .. }))
                .cloned()
                .collect(),
            cfg,
        })
    }

    /// The rollouts of step `step` from `sampler` (the current policy, inner device) and their rewards.
    pub fn rollouts(
        &mut self,
        step: usize,
        spec: &RlStage,
        sampler: &Llava,
        start: &Built,
        device: &Device,
    ) -> Result<(Vec<Rollout>, Vec<f64>)> {
        let which = self.batches.at(step);
        let mut rolls = vec![];
        for (c, chunk) in which.chunks(spec.batch.micro).enumerate() {
            let first = ((step * spec.batch.global + c * spec.batch.micro) * spec.group) as u64;
            rolls.extend(rollout::sample(
                sampler,
                start,
                &self.prompts,
                &self.prompt_ids,
                chunk,
                spec.group,
                &self.cfg,
                first,
                device,
            )?);
        }
        let r = rewards(&spec.rewards, &self.models, &rolls, &self.prompts, device)?;
        Ok((rolls, r))
    }

    /// Logs the mean greedy rule reward on the held-out prompts (`when` = before / after).
    pub fn heldout(
        &self,
        eng: &mut Engine,
        model: &Llava,
        start: &Built,
        step: usize,
        when: &str,
        device: &Device,
    ) -> Result<()> {
        if self.held.is_empty() || self.rules.is_empty() {
            return Ok(());
        }
        let h = heldout_reward(
            model,
            start,
            &self.template,
            &self.held,
            &self.rules,
            self.cfg.max_new_tokens,
            device,
        )?;
        eng.note(&format!("held-out reward {when}: {h:.3}"));
        eng.metrics
            .write(serde_json::json!({"stage": eng.name, "step": step, "heldout_reward": h}))
    }
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
        "grpo: {} prompts x {} completions, {per_epoch} steps/epoch",
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
    for step in eng.range() {
        eng.begin(step);
        // rollouts from the current policy
        let sampler = model.valid();
        let (rolls, r) = rl.rollouts(step, spec, &sampler, &start, &inner)?;
        let adv = group_advantages(&r, spec.group);
        let per = spec.batch.micro * spec.group;
        let rows: Vec<&Encoded> = rolls.iter().map(|x| &x.row).collect();
        let mut old = vec![];
        let mut refs = vec![];
        for chunk in rows.chunks(per) {
            if spec.updates > 1 {
                old.extend(token_logps_of(&sampler, chunk, &start, &inner)?);
            }
            if let Some(rm) = &reference {
                refs.extend(token_logps_of(rm, chunk, &start, &inner)?);
            }
        }
        let mut stats = Stats::default();
        let mut step_loss = 0.0;
        let mut norm = 0.0;
        for _ in 0..spec.updates {
            let mut acc = GradientsAccumulator::<Llava>::new();
            let mut update_loss = 0.0;
            for (k, chunk) in rows.chunks(per).enumerate() {
                let span = k * per..k * per + chunk.len();
                let l = micro_loss(
                    &model,
                    chunk,
                    &adv[span.clone()],
                    (spec.updates > 1).then(|| &old[span.clone()]),
                    reference.as_ref().map(|_| &refs[span]),
                    spec,
                    &start,
                    device,
                    &mut stats,
                )?
                .div_scalar(rows.len() as f64);
                update_loss += l.clone().into_scalar::<f32>() as f64;
                acc.accumulate(&model, GradientsParams::from_grads(l.backward(), &model));
            }
            // each update is checked before it touches the weights
            (model, norm) = eng.update(model, step, update_loss, acc.grads())?;
            step_loss += update_loss / spec.updates as f64;
        }
        let mean = r.iter().sum::<f64>() / r.len() as f64;
        eng.end(
            &model,
            step,
            step_loss,
            norm,
            None,
            || {
                let std =
                    (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / r.len() as f64).sqrt();
                let toks = stats.tokens.max(1.0);
                serde_json::json!({
                    "loss": step_loss, "reward": mean, "reward_std": std,
                    "kl": stats.kl / toks, "clip_fraction": stats.clipped / toks, "entropy": stats.entropy / toks,
                    "completion_length": rolls.iter().map(|x| x.tokens).sum::<usize>() as f64 / rolls.len() as f64,
                })
            },
            |tmp| save(&model, tmp),
        )?;
    }
    rl.heldout(&mut eng, &model.valid(), &start, total, "after", &inner)?;
    eng.finish(|dir| save(&model, &dir.join("model")))?;
    Ok(Built { model, ..start })
}

#[cfg(test)]
mod tests {
    use super::group_advantages;

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
}
