//! What the RL stages (grpo, ppo) share: prompts loaded and encoded through the template, the step batches, the
//! reward terms (rules, reward models) and their weighted sum per rollout, rollouts dealt over the ranks of a
//! data-parallel job micro-batch by micro-batch, statistics over all ranks' rollouts, held-out greedy reward,
//! and the policy's per-token log-probs of the completion tokens.
use burn::tensor::{Device, Tensor};
use std::path::Path;

use super::batches::Batches;
use super::loss;
use super::reward_model::RewardModel;
use super::rewards::{RewardSpec, reward_models, rewards};
use super::rollout::{self, Rollout};
use super::steps::Engine;
use crate::data::contract;
use crate::data::loader::MicroBatch;
use crate::data::preference::{PromptItem, load_prompts};
use crate::error::{Error, Result};
use crate::generate::GenConfig;
use crate::model::Built;
use crate::recipe::schema::{OnBad, PromptData, RlStage};
use crate::zoo::mllm::Llava;

/// One micro-batch of prompts' rollouts (prompt-major: each prompt's `group` completions in turn) and the
/// weighted reward of each.
pub struct Chunk {
    pub rolls: Vec<Rollout>,
    pub rewards: Vec<f64>,
    /// The rewards of the micro-batch's own prompts' rollouts (before dynamic sampling replaced any group): what
    /// the logged reward and `frac_reward_zero_std` describe.
    pub sampled: Vec<f64>,
    /// Dynamic sampling's refill rounds.
    pub refills: usize,
}

/// Seed offset of refill round r's completions (round r samples with indices `first + r·REFILL_SEEDS + …`), far
/// beyond any step's own indices.
const REFILL_SEEDS: u64 = 1 << 40;

/// Whether a group's rewards all equal its first (no advantage, no signal).
fn flat(rewards: &[f64]) -> bool {
    rewards.iter().all(|&r| r == rewards[0])
}

/// Over every rank's micro-batches: the share of the sampled groups whose rewards are all equal (TRL's
/// `frac_reward_zero_std`) and dynamic sampling's refill rounds.
pub fn group_stats(chunks: &[Option<Chunk>], g: usize) -> (f64, f64) {
    let mut s = [0.0f64; 3];
    for c in chunks.iter().flatten() {
        s[0] += c.sampled.chunks(g).filter(|r| flat(r)).count() as f64;
        s[1] += (c.sampled.len() / g) as f64;
        s[2] += c.refills as f64;
    }
    crate::dist::sum_f64(&mut s, "the group statistics' all-reduce");
    (s[0] / s[1].max(1.0), s[2])
}

/// A group's rollouts and their rewards.
type Group = (Vec<Rollout>, Vec<f64>);

/// Splits rollouts into groups of `g`: those with signal onto `kept`, the others onto `dropped` (when given).
fn split(
    rolls: Vec<Rollout>,
    rewards: &[f64],
    g: usize,
    kept: &mut Vec<Group>,
    mut dropped: Option<&mut Vec<Group>>,
) {
    let mut it = rolls.into_iter();
    for r in rewards.chunks(g) {
        let grp: Vec<Rollout> = it.by_ref().take(g).collect();
        match (flat(r), dropped.as_deref_mut()) {
            (false, _) => kept.push((grp, r.to_vec())),
            (true, Some(d)) => d.push((grp, r.to_vec())),
            (true, None) => {}
        }
    }
}

/// Mean and standard deviation (population and unbiased) of values spread over the ranks (`mine`: this rank's),
/// and their count; in one process, those of `mine`.
pub fn global_stats(mine: &[f64]) -> (f64, f64, f64, usize) {
    let mut s = [mine.iter().sum::<f64>(), mine.len() as f64];
    crate::dist::sum_f64(&mut s, "the rollout statistics' all-reduce");
    let (n, mean) = (s[1], s[0] / s[1].max(1.0));
    let mut d = [mine.iter().map(|x| (x - mean).powi(2)).sum::<f64>()];
    crate::dist::sum_f64(&mut d, "the rollout statistics' all-reduce");
    (
        mean,
        (d[0] / n.max(1.0)).sqrt(),
        (d[0] / (n - 1.0).max(1.0)).sqrt(),
        n as usize,
    )
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

/// Mean greedy reward on held-out prompts (the terms other than reward models).
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
    let mut cfg = GenConfig::greedy(max_new, crate::generate::stop_ids(model, &b.text));
    cfg.suppress = crate::generate::media_ids(model);
    let mut sum = [0.0];
    let chunks: Vec<Vec<usize>> = (0..items.len())
        .collect::<Vec<_>>()
        .chunks(16)
        .map(<[usize]>::to_vec)
        .collect();
    // data parallel: each rank answers every N-th chunk, the scores are summed
    for chunk in crate::dist::shard(chunks.len()).map(|k| &chunks[k]) {
        let rolls = rollout::sample(model, b, items, &ids, chunk, 1, &cfg, 0, device)?;
        sum[0] += rewards(specs, &[], &rolls, items, device)?
            .iter()
            .sum::<f64>();
    }
    crate::dist::sum_f64(&mut sum, "the held-out rewards' all-reduce");
    Ok(sum[0] / items.len().max(1) as f64)
}

/// Per-token log-probs [b, t-1] (and entropies) of a micro-batch's response tokens from `model`'s final hidden
/// states, the LM head on those positions only; 0 elsewhere (every use masks to the response). GRPO and PPO.
pub fn response_logps(
    model: &Llava,
    hidden: Tensor<3>,
    mb: &MicroBatch,
    entropy: bool,
) -> (Tensor<2>, Option<Tensor<2>>) {
    let head = |h| model.language_model.logits(h);
    loss::supervised_token_logps(hidden, head, &mb.ids, &mb.labels, entropy)
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
    /// The terms other than reward models (held-out scoring uses only these).
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
        // a sampled placeholder id would ask for an image the rollout's row does not have when it is trained on
        cfg.suppress = crate::generate::media_ids(&start.model);
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

    /// This rank's rollouts of step `step`, one entry per micro-batch of `micro` prompts of the step's global
    /// batch (None for the other ranks' micro-batches: `crate::dist::shard` gives each rank the same share that
    /// `Engine::accumulate` gives it for the updates): the `group` completions of each prompt sampled with
    /// `sampler` (the current policy, inner device), and their rewards. Each completion is seeded by its place in
    /// the global batch, so the rollouts are the same however many ranks share them.
    pub fn rollouts(
        &mut self,
        step: usize,
        spec: &RlStage,
        sampler: &Llava,
        start: &Built,
        device: &Device,
    ) -> Result<Vec<Option<Chunk>>> {
        let which = self.batches.at(step);
        let micro = spec.batch.micro;
        let chunks: Vec<Vec<usize>> = which.chunks(micro).map(<[usize]>::to_vec).collect();
        let mut out: Vec<Option<Chunk>> = (0..chunks.len()).map(|_| None).collect();
        let g = spec.group;
        for c in crate::dist::shard(chunks.len()) {
            let first = ((step * spec.batch.global + c * micro) * g) as u64;
            let (rolls, rewards) = self.sample(spec, sampler, start, &chunks[c], first, device)?;
            let sampled = rewards.clone();
            let (rolls, rewards, refills) = match spec.dynamic_sampling {
                Some(rounds) if rounds > 0 && rewards.chunks(g).any(flat) => {
                    // DAPO's dynamic sampling, per micro-batch (each is one rank's, so the result does not
                    // depend on how many ranks share the step): groups without signal are dropped and refilled
                    // from the prompts this micro-batch has at the following steps, seeded apart
                    let (mut kept, mut dropped) = (vec![], vec![]);
                    split(rolls, &rewards, g, &mut kept, Some(&mut dropped));
                    let mut round = 0;
                    while kept.len() < chunks[c].len() && round < rounds {
                        round += 1;
                        let later = self.batches.at((step + round) % self.batches.total);
                        let Some(cand) = later.chunks(micro).nth(c).map(<[usize]>::to_vec) else {
                            break;
                        };
                        let first = first + round as u64 * REFILL_SEEDS;
                        let (r, w) = self.sample(spec, sampler, start, &cand, first, device)?;
                        split(r, &w, g, &mut kept, None);
                    }
                    // still short: the dropped groups fill the micro-batch (zero advantage: only their KL
                    // term acts), so every micro-batch keeps its size
                    kept.truncate(chunks[c].len());
                    let short = chunks[c].len() - kept.len();
                    kept.extend(dropped.into_iter().take(short));
                    let (rolls, rewards): (Vec<_>, Vec<_>) = kept.into_iter().unzip();
                    (
                        rolls.into_iter().flatten().collect(),
                        rewards.into_iter().flatten().collect(),
                        round,
                    )
                }
                _ => (rolls, rewards, 0),
            };
            out[c] = Some(Chunk {
                rolls,
                rewards,
                sampled,
                refills,
            });
        }
        Ok(out)
    }

    /// The `group` completions of each prompt in `which` (completion k of the prompt at position i seeded with
    /// index `first + i·group + k`) and their rewards.
    fn sample(
        &self,
        spec: &RlStage,
        sampler: &Llava,
        start: &Built,
        which: &[usize],
        first: u64,
        device: &Device,
    ) -> Result<(Vec<Rollout>, Vec<f64>)> {
        let rolls = rollout::sample(
            sampler,
            start,
            &self.prompts,
            &self.prompt_ids,
            which,
            spec.group,
            &self.cfg,
            first,
            device,
        )?;
        let rewards = rewards(&spec.rewards, &self.models, &rolls, &self.prompts, device)?;
        Ok((rolls, rewards))
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
