//! `kind = "ppo"`: RLHF's policy optimisation (InstructGPT, LLaVA-RLHF): the policy with a value head on its
//! final hidden states, rollouts sampled with the KV cache, a per-token reward −β·(log π − log π_ref) plus the
//! sequence reward (reward model and/or rules) on the last completion token, GAE over the completion tokens
//!     δ_t = r_t + γ V_{t+1} − V_t,   Â_t = δ_t + γλ Â_{t+1},   R_t = Â_t + V_t   (V after the end = 0),
//! advantages whitened over the batch, then `updates` epochs of the clipped surrogate
//! −min(ρÂ, clip(ρ, 1−ε, 1+ε)Â) plus vf_coef · ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²), averaged over
//! completion tokens. Logged: reward, KL, entropy, clip fraction, value loss, completion length.
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use std::path::{Path, PathBuf};

use super::backward::{hidden_backward, to_input};
use super::loss;
use super::rl::{RlSetup, global_stats, response_logps};
use super::steps::{Engine, Micro, StageRun};
use crate::checkpoint::safetensors_io::{ToWrite, WeightStore, write_file};
use crate::data::loader::micro_batch;
use crate::data::templates::Encoded;
use crate::error::{Error, Result};
use crate::model::{self, Built, export};
use crate::recipe::schema::{Part, RlStage};
use crate::zoo::layers::{float_tensor, to_vec};
use crate::zoo::mllm::{Backbone, Llava};

const VALUE_FILE: &str = "value_head.safetensors";

#[derive(Module, Debug)]
pub struct PolicyValue {
    pub llava: Llava,
    /// hidden -> 1 (TRL's value head)
    pub value: Linear,
}

impl PolicyValue {
    fn new(llava: Llava, device: &Device) -> Self {
        let d = llava.spec.llm.hidden_size;
        let mut value = LinearConfig::new(d, 1).with_bias(false).init(device);
        value.weight = Param::from_tensor(Tensor::zeros([d, 1], device));
        PolicyValue { llava, value }
    }

    /// (final hidden states [b, t, d], values [b, t]) in one pass; `response_logps` puts the LM head on them.
    fn forward(&self, input: &crate::zoo::mllm::MmInput) -> Result<(Tensor<3>, Tensor<2>)> {
        let h = self.llava.hidden(input)?;
        let [b, t, _] = h.dims();
        let v = self.value.forward(h.clone()).reshape([b, t]);
        Ok((h, v))
    }
}

impl Backbone for PolicyValue {
    fn llava(&self) -> &Llava {
        &self.llava
    }
    fn map_llava(self, f: impl FnOnce(Llava) -> Result<Llava>) -> Result<Self> {
        Ok(PolicyValue {
            llava: f(self.llava)?,
            value: self.value,
        })
    }
}

/// GAE over one completion: token rewards and values (same length), γ, λ -> (advantages, returns).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_v = 0.0;
    let mut next_a = 0.0;
    for t in (0..n).rev() {
        let delta = rewards[t] + gamma * next_v - values[t];
        next_a = delta + gamma * lam * next_a;
        adv[t] = next_a;
        next_v = values[t];
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Whitening as TRL's `masked_whiten`: (x − mean) / sqrt(var + 1e-8), unbiased variance, mean shifted back out;
/// over the values of every rank of a data-parallel job (`x`: this rank's).
pub fn whiten(x: &mut [f64]) {
    let mut s = [x.iter().sum::<f64>(), x.len() as f64];
    crate::dist::sum_f64(&mut s, "the advantages' all-reduce");
    let n = s[1];
    if n < 2.0 {
        return;
    }
    let mean = s[0] / n;
    let mut d = [x.iter().map(|v| (v - mean).powi(2)).sum::<f64>()];
    crate::dist::sum_f64(&mut d, "the advantages' all-reduce");
    let var = d[0] / (n - 1.0);
    for v in x.iter_mut() {
        *v = (*v - mean) / (var + 1e-8).sqrt();
    }
}

/// One micro-batch of rollouts ready for the updates: rows, the sampler's per-token log-probs and values, and
/// per-token advantages and returns (over positions 1..t, 0 outside the completion).
struct Work<'r> {
    rows: Vec<&'r Encoded>,
    old: Vec<Vec<f32>>,
    vals: Vec<Vec<f32>>,
    advs: Vec<Vec<f64>>,
    rets: Vec<Vec<f64>>,
}

impl Work<'_> {
    /// (row, position) of every completion token, in row order.
    fn completion_tokens(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.rows.iter().enumerate().flat_map(|(i, r)| {
            (0..r.ids.len() - 1)
                .filter(|&k| r.labels[k + 1])
                .map(move |k| (i, k))
        })
    }
}

/// Per-row vectors over next-token positions (1..t) of a padded [n, t-1] tensor, cut to each row's length.
fn rows_of(t: Tensor<2>, lens: &[usize]) -> Vec<Vec<f32>> {
    let [n, w] = t.dims();
    let v = to_vec(t);
    (0..n)
        .map(|i| v[i * w..i * w + lens[i].min(w)].to_vec())
        .collect()
}

/// Pads per-row vectors into [n, w].
fn padded(rows: &[Vec<f64>], w: usize, device: &Device) -> Tensor<2> {
    let mut out = Vec::with_capacity(rows.len() * w);
    for r in rows {
        out.extend(r.iter().take(w).map(|&x| x as f32));
        out.extend(std::iter::repeat_n(0.0, w.saturating_sub(r.len())));
    }
    float_tensor(out, [rows.len(), w], device)
}

fn save_value(pv: &PolicyValue, dir: &Path) -> Result<()> {
    // data parallel: rank 0 alone writes (every rank holds the same head)
    if !crate::dist::writer() {
        return Ok(());
    }
    let w = to_vec(pv.value.weight.val());
    write_file(
        &dir.join(VALUE_FILE),
        &[ToWrite::f32(
            "v_head.weight".into(),
            vec![1, w.len()],
            &w,
            safetensors::Dtype::F32,
        )],
    )
}

fn load_value(pv: &mut PolicyValue, dir: &Path, device: &Device) -> Result<()> {
    let store = WeightStore::open_files(&[dir.join(VALUE_FILE)])?;
    let w = store.get("v_head.weight")?;
    let d = pv.llava.spec.llm.hidden_size;
    pv.value.weight = Param::from_tensor(float_tensor(w.values, [d, 1], device));
    Ok(())
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
    let (gamma, lam, vf_coef) = (
        spec.gamma.unwrap_or(1.0),
        spec.lam.unwrap_or(0.95),
        spec.vf_coef.unwrap_or(0.1),
    );
    let mut rl = RlSetup::new(&eng, spec, &start, run_dir, &inner)?;
    let (per_epoch, total) = (rl.batches.per_epoch, rl.batches.total);
    let template = eng.template.clone();
    let mut train = eng.train(&[Part::Connector, Part::Llm]);
    let reference = eng.frozen_copy(start.model.valid(), &train)?;
    train.push(Part::Head.name().into());
    let pv = match &resume {
        Some(ck) => {
            let mut pv = PolicyValue::new(model::load_dir(ck, device)?.model, device);
            load_value(&mut pv, ck, device)?;
            pv
        }
        None => PolicyValue::new(start.model.clone(), device),
    };
    let what = format!(
        "ppo: {} prompts x {} completions, {} epochs per batch, {per_epoch} steps/epoch",
        rl.prompts.len(),
        spec.group,
        spec.updates,
    );
    let mut pv = eng.start(pv, total, resume.as_deref(), &train, &what)?;
    if eng.first == 0 {
        rl.heldout(&mut eng, &pv.llava.valid(), &start, 0, "before", &inner)?;
    }
    let save = |m: &PolicyValue, out: &Path| -> Result<()> {
        export(
            &m.llava,
            &start.text,
            &start.processor,
            Some(&template),
            None,
            out,
        )?;
        save_value(m, out)
    };
    for step in eng.range() {
        eng.begin(step);
        let frozen = pv.valid();
        // this rank's rollouts, one entry per micro-batch of prompts
        let chunks = rl.rollouts(step, spec, &frozen.llava, &start, &inner)?;
        let mut work: Vec<Option<Work>> = vec![];
        // [KL sum, completion tokens] over the ranks' rollouts
        let mut sums = [0.0f64; 2];
        for c in &chunks {
            let Some(c) = c else {
                work.push(None);
                continue;
            };
            let rows: Vec<&Encoded> = c.rolls.iter().map(|r| &r.row).collect();
            // old log-probs and values, reference log-probs (no gradients), per row over positions 1..t
            let mb = micro_batch(&rows, start.text.pad_id(), &start.images);
            let input = to_input(&mb, &inner)?;
            let lens: Vec<usize> = rows.iter().map(|r| r.ids.len() - 1).collect();
            let (hidden, v) = frozen.forward(&input)?;
            let t = v.dims()[1];
            let old = rows_of(response_logps(&frozen.llava, hidden, &mb, false).0, &lens);
            let vals = rows_of(v.slice([0..rows.len(), 0..t - 1]), &lens);
            let hidden = reference.hidden(&input)?;
            let refs = rows_of(response_logps(&reference, hidden, &mb, false).0, &lens);
            // token rewards, GAE over each completion (positions where the next token is a target)
            let (mut advs, mut rets) = (vec![], vec![]);
            for (i, r) in rows.iter().enumerate() {
                let pos: Vec<usize> = (0..r.ids.len() - 1).filter(|&k| r.labels[k + 1]).collect();
                let kl: Vec<f64> = pos
                    .iter()
                    .map(|&k| (old[i][k] - refs[i][k]) as f64)
                    .collect();
                sums[0] += kl.iter().sum::<f64>();
                sums[1] += pos.len() as f64;
                let mut tr: Vec<f64> = kl.iter().map(|k| -spec.kl_beta * k).collect();
                if let Some(last) = tr.last_mut() {
                    *last += c.rewards[i];
                }
                let v: Vec<f64> = pos.iter().map(|&k| vals[i][k] as f64).collect();
                let (a, ret) = gae(&tr, &v, gamma, lam);
                // scatter back to full positions (zeros outside the completion)
                let mut fa = vec![0.0; r.ids.len() - 1];
                let mut fr = vec![0.0; r.ids.len() - 1];
                for (j, &k) in pos.iter().enumerate() {
                    fa[k] = a[j];
                    fr[k] = ret[j];
                }
                advs.push(fa);
                rets.push(fr);
            }
            work.push(Some(Work {
                rows,
                old,
                vals,
                advs,
                rets,
            }));
        }
        crate::dist::sum_f64(&mut sums, "the KL and token counts' all-reduce");
        let (kl_sum, n_tok) = (sums[0], sums[1] as usize);
        // whiten the advantages over all completion tokens of the batch (every rank's)
        let mut flat: Vec<f64> = work
            .iter()
            .flatten()
            .flat_map(|w| w.completion_tokens().map(|(i, k)| w.advs[i][k]))
            .collect();
        whiten(&mut flat);
        let mut it = flat.into_iter();
        for w in work.iter_mut().flatten() {
            for (i, k) in w.completion_tokens().collect::<Vec<_>>() {
                w.advs[i][k] = it.next().unwrap_or(0.0);
            }
        }
        let mine: Vec<f64> = chunks
            .iter()
            .flatten()
            .flat_map(|c| c.rewards.iter().copied())
            .collect();
        let (reward, _, _, n_rolls) = global_stats(&mine);
        let mut lengths = [chunks
            .iter()
            .flatten()
            .flat_map(|c| c.rolls.iter().map(|r| r.tokens as f64))
            .sum::<f64>()];
        crate::dist::sum_f64(&mut lengths, "the completion lengths' all-reduce");
        // [clipped tokens, value loss sum, entropy sum] over the updates
        let mut stats = [0.0f64; 3];
        let (mut step_loss, mut norm) = (0.0, 0.0);
        for _ in 0..spec.updates {
            // each update is checked before it touches the weights
            let up = eng.accumulate(pv, step, work.len(), 3, |c, pv| {
                let w = work[c].as_ref().ok_or_else(|| {
                    Error::input(format!("ppo: micro-batch {c} has no rollouts on this rank"))
                })?;
                let mb = micro_batch(&w.rows, start.text.pad_id(), &start.images);
                let input = to_input(&mb, device)?;
                let tail = |hidden: Tensor<3>| -> Result<_> {
                    let [b, t, _] = hidden.dims();
                    let v = pv.value.forward(hidden.clone()).reshape([b, t]);
                    let (logp, ent) = response_logps(&pv.llava, hidden, &mb, true);
                    let [n, wd] = logp.dims();
                    let mask = loss::target_mask(&mb.labels, device);
                    let as64 = |rows: &[Vec<f32>]| -> Vec<Vec<f64>> {
                        rows.iter()
                            .map(|r| r.iter().map(|&x| x as f64).collect())
                            .collect()
                    };
                    let old_t = padded(&as64(&w.old), wd, device);
                    let vold_t = padded(&as64(&w.vals), wd, device);
                    let adv_t = padded(&w.advs, wd, device);
                    let ret_t = padded(&w.rets, wd, device);
                    let ratio = (logp - old_t).exp();
                    let e = spec.clip_eps;
                    let pg = (ratio.clone() * adv_t.clone())
                        .min_pair(ratio.clone().clamp(1.0 - e, 1.0 + e) * adv_t)
                        .neg();
                    let v = v.slice([0..n, 0..wd]);
                    let v_clip = vold_t.clone() + (v.clone() - vold_t).clamp(-e, e);
                    let vf = (v - ret_t.clone())
                        .powi_scalar(2)
                        .max_pair((v_clip - ret_t).powi_scalar(2))
                        .mul_scalar(0.5);
                    let per_tok = pg + vf.clone().mul_scalar(vf_coef);
                    let l = (per_tok * mask.clone())
                        .sum()
                        .div_scalar(n_tok.max(1) as f64);
                    let (rv, mv) = (to_vec(ratio), to_vec(mask.clone()));
                    let clipped = rv
                        .iter()
                        .zip(&mv)
                        .filter(|(r, m)| {
                            **m > 0.0 && ((**r as f64) < 1.0 - e || (**r as f64) > 1.0 + e)
                        })
                        .count() as f64;
                    let vf_sum = to_vec(vf * mask.clone())
                        .iter()
                        .map(|&x| x as f64)
                        .sum::<f64>();
                    let ent_sum = ent.map_or(0.0, |en| {
                        to_vec(en * mask).iter().map(|&x| x as f64).sum::<f64>()
                    });
                    Ok((l, vec![clipped, vf_sum, ent_sum]))
                };
                let ckpt = spec.checkpoint_activations;
                let (loss, grads, sums) = hidden_backward(pv, &pv.llava, &input, ckpt, tail)?;
                Ok(Micro { loss, grads, sums })
            })?;
            pv = up.model;
            norm = up.norm;
            for (a, b) in stats.iter_mut().zip(&up.sums) {
                *a += b;
            }
            step_loss += up.loss / spec.updates as f64;
        }
        eng.end(
            &pv,
            step,
            step_loss,
            norm,
            None,
            || {
                let tok = (n_tok * spec.updates).max(1) as f64;
                serde_json::json!({
                    "loss": step_loss,
                    "reward": reward,
                    "kl": kl_sum / n_tok.max(1) as f64, "entropy": stats[2] / tok, "clip_fraction": stats[0] / tok,
                    "value_loss": stats[1] / tok,
                    "completion_length": lengths[0] / n_rolls.max(1) as f64,
                })
            },
            |tmp| save(&pv, tmp),
        )?;
        if eng.eval_due(step) {
            let when = format!("at step {}", step + 1);
            rl.heldout(&mut eng, &pv.llava.valid(), &start, step + 1, &when, &inner)?;
        }
    }
    rl.heldout(&mut eng, &pv.llava.valid(), &start, total, "after", &inner)?;
    let pv = eng.finish_model(pv, save, |_, _| Ok(()))?;
    Ok(Built {
        model: pv.llava,
        ..start
    })
}

#[cfg(test)]
mod tests {
    use super::{gae, whiten};

    #[test]
    fn gae_on_a_hand_made_trajectory() {
        // r = [0, 0, 1], V = [0.5, 0.6, 0.7], γ = 1, λ = 0.9:
        // δ2 = 1 − 0.7 = 0.3;           Â2 = 0.3
        // δ1 = 0 + 0.7 − 0.6 = 0.1;     Â1 = 0.1 + 0.9·0.3 = 0.37
        // δ0 = 0 + 0.6 − 0.5 = 0.1;     Â0 = 0.1 + 0.9·0.37 = 0.433
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.6, 0.7], 1.0, 0.9);
        for (x, y) in a.iter().zip([0.433, 0.37, 0.3]) {
            assert!((x - y).abs() < 1e-12, "{a:?}");
        }
        for (x, y) in r.iter().zip([0.933, 0.97, 1.0]) {
            assert!((x - y).abs() < 1e-12, "{r:?}");
        }
        // γ = 0.5, λ = 1: Â2 = 0.3; Â1 = (0 + 0.5·0.7 − 0.6) + 0.5·0.3 = −0.1; Â0 = (0.3 − 0.5) + 0.5·−0.1 = −0.25
        let (a, _) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.6, 0.7], 0.5, 1.0);
        for (x, y) in a.iter().zip([-0.25, -0.1, 0.3]) {
            assert!((x - y).abs() < 1e-12, "{a:?}");
        }
    }

    #[test]
    fn whitening_centres_and_scales() {
        let mut x = vec![1.0, 2.0, 3.0];
        whiten(&mut x);
        // mean 2, unbiased variance 1
        for (v, want) in x.iter().zip([-1.0, 0.0, 1.0]) {
            assert!((v - want).abs() < 1e-6, "{x:?}");
        }
    }
}
