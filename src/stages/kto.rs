//! `kind = "kto"`: Kahneman–Tversky optimisation (Ethayarajh et al. 2024) on unpaired completions labelled
//! desirable or undesirable, as TRL's KTOTrainer (`loss_type = "kto"`) computes it.
//!
//! Per example: the log-ratio ρ = log π(y|x) − log π_ref(y|x) (log-probs summed over the completion's tokens), and
//! the KL baseline z = max(0, mean over the micro-batch of log π(y'|x) − log π_ref(y'|x)), where each prompt x is
//! paired with the completion y' of the micro-batch's previous example (TRL's shifted KL pairs; z carries no
//! gradient). Then
//!     desirable:    λ_D · (1 − σ(β(ρ − z))),      undesirable:  λ_U · (1 − σ(β(z − ρ))),
//! averaged over the examples (`desirable_weight` λ_D, `undesirable_weight` λ_U). The reference is a frozen copy of
//! the stage's starting model. Logged with TRL's names: loss, kl, rewards/chosen and rewards/rejected (β·ρ of the
//! desirable / undesirable examples), logps/chosen, logps/rejected, count/chosen, count/rejected; held-out loss
//! and rewards at the end. z is computed per micro-batch (TRL's per-device batch), so it does not depend on how
//! many ranks share the step.
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use std::path::{Path, PathBuf};

use super::backward::{hidden_backward, to_input};
use super::batches::{Batches, pack_cap};
use super::pairs::{SeqBatch, response_sample};
use super::steps::{self, Engine, Micro, StageRun};
use crate::data::contract::{self, Bad};
use crate::data::preference::{Unpaired, load_unpaired};
use crate::data::templates::{self, Encoded};
use crate::error::{Error, Result};
use crate::model::{Built, export};
use crate::recipe::schema::{KtoStage, Part, UnpairedData};
use crate::zoo::layers::{float_tensor, to_vec};
use crate::zoo::mllm::Llava;

/// Summed completion log-probs of each sequence of a micro-batch under a model without gradients.
fn logps(model: &Llava, sb: &SeqBatch, device: &Device) -> Result<Vec<f32>> {
    Ok(to_vec(sb.logps_of(model, device)?))
}

/// An example as read and as encoded (its completion supervised).
pub type Example = (Unpaired, Encoded);

/// Loads every source, encodes each example, applies the bad-sample policy (every bad example listed in `list`).
pub fn load_encode(
    data: &UnpairedData,
    start: &Built,
    template: &str,
    spec: &KtoStage,
    list: &Path,
    key: &str,
) -> Result<Vec<Example>> {
    let (mut out, mut bad) = (vec![], vec![]);
    for s in &data.sources {
        let (mut items, b) = load_unpaired(s.format, &s.path, s.images.as_deref())?;
        bad.extend(b);
        if let Some(c) = s.cap {
            items.truncate(c);
        }
        for (k, u) in items.into_iter().enumerate() {
            let sample = response_sample(&u.id, &u.images, &u.history, &u.completion);
            match templates::encode_last(&start.text, template, &sample, out.len(), spec.max_len) {
                Ok(e) => out.push((u, e)),
                Err(e) => bad.push(Bad::new(
                    format!("{}:{k} ({})", s.path.display(), u.id),
                    e.kind,
                    e.reason,
                )),
            }
        }
    }
    contract::settle(&bad, spec.on_bad_sample, list, key, "example")?;
    if out.is_empty() {
        return Err(Error::input(format!("{key}: no usable example")));
    }
    Ok(out)
}

/// The KL rows of a micro-batch: prompt i with the completion of example i − 1 (the last one's for i = 0).
fn kl_rows(
    chunk: &[&Example],
    start: &Built,
    template: &str,
    max_len: usize,
    key: &str,
) -> Result<Vec<Encoded>> {
    let n = chunk.len();
    (0..n)
        .map(|i| {
            let (x, y) = (&chunk[i].0, &chunk[(i + n - 1) % n].0);
            let s = response_sample(&x.id, &x.images, &x.history, &y.completion);
            templates::encode_last(&start.text, template, &s, i, max_len).map_err(|e| {
                Error::input(format!(
                    "{key}: the KL pair of prompt {} with the completion of {} does not fit: {} (raise max_len)",
                    x.id, y.id, e.reason
                ))
            })
        })
        .collect()
}

/// KTO's settings.
pub struct Kto {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// Per-example KTO losses [n] and the KL baseline z, from the policy's completion log-probs `logp` [n] (with
/// gradients), the reference's `reference`, and the policy's and reference's log-probs of the KL rows.
pub fn kto_losses(
    k: &Kto,
    logp: Tensor<1>,
    reference: &[f32],
    kl_policy: &[f32],
    kl_reference: &[f32],
    labels: &[bool],
    device: &Device,
) -> (Tensor<1>, f64) {
    let n = labels.len();
    // z = max(0, mean(log π − log π_ref) over the KL rows), a constant of the loss
    let z = (kl_policy
        .iter()
        .zip(kl_reference)
        .map(|(p, r)| (p - r) as f64)
        .sum::<f64>()
        / n.max(1) as f64)
        .max(0.0);
    let rho = logp - float_tensor(reference.to_vec(), [n], device);
    // desirable: 1 − σ(β(ρ − z)); undesirable: 1 − σ(β(z − ρ)) = 1 − σ(−β(ρ − z)): one sign per row
    let sign: Vec<f32> = labels.iter().map(|&d| if d { 1.0 } else { -1.0 }).collect();
    let weight: Vec<f32> = labels
        .iter()
        .map(|&d| {
            if d {
                k.desirable_weight
            } else {
                k.undesirable_weight
            }
        } as f32)
        .collect();
    let x = (rho - z).mul_scalar(k.beta) * float_tensor(sign, [n], device);
    let losses =
        (burn::tensor::activation::sigmoid(x).neg() + 1.0) * float_tensor(weight, [n], device);
    (losses, z)
}

/// The logged sums: [examples, loss, desirable, their rewards, their log-probs, undesirable, their rewards,
/// their log-probs, KL baseline (one per micro-batch), micro-batches].
fn sums(k: &Kto, losses: &[f32], rho: &[f64], logp: &[f32], labels: &[bool], z: f64) -> Vec<f64> {
    let mut s = vec![0.0f64; 10];
    s[0] = labels.len() as f64;
    s[1] = losses.iter().map(|&x| x as f64).sum();
    for ((&d, r), &lp) in labels.iter().zip(rho).zip(logp) {
        let at = if d { 2 } else { 5 };
        s[at] += 1.0;
        s[at + 1] += k.beta * r;
        s[at + 2] += lp as f64;
    }
    s[8] = z;
    s[9] = 1.0;
    s
}

/// The logged means of `s` (see `sums`).
fn json(s: &[f64]) -> serde_json::Value {
    let (d, u) = (s[2].max(1.0), s[5].max(1.0));
    serde_json::json!({
        "loss": s[1] / s[0].max(1.0), "kl": s[8] / s[9].max(1.0),
        "rewards/chosen": s[3] / d, "rewards/rejected": s[6] / u,
        "logps/chosen": s[4] / d, "logps/rejected": s[7] / u,
        "count/chosen": s[2], "count/rejected": s[5],
    })
}

pub fn run(ctx: StageRun, spec: &KtoStage, start: Built, resume: Option<PathBuf>) -> Result<Built> {
    let mut eng = Engine::new(ctx, &start.text)?;
    let device = eng.device;
    let inner = device.clone().inner();
    let template = eng.template.clone();
    let key = eng.key.clone();
    let load = |d: &UnpairedData, k: &str, list: &str| {
        let list = eng.dir.join(list);
        load_encode(d, &start, &template, spec, &list, &format!("{key}.{k}"))
    };
    let examples = load(&spec.data, "data", "skipped.jsonl")?;
    let heldout = match &spec.heldout {
        Some(h) => load(h, "heldout", "skipped-heldout.jsonl")?,
        None => vec![],
    };
    let mut batches = Batches::new(
        &key,
        "examples",
        spec.batch.global,
        eng.seed,
        examples.iter().map(|e| !e.0.images.is_empty()).collect(),
        examples.iter().map(|e| e.1.ids.len()).collect(),
        spec.epochs,
        spec.max_steps,
    )?;
    let (per_epoch, total) = (batches.per_epoch, batches.total);
    let pack = pack_cap(spec.pack, spec.max_len, &start.model, &eng.key)?;
    let k = Kto {
        beta: spec.beta,
        desirable_weight: spec.desirable_weight,
        undesirable_weight: spec.undesirable_weight,
    };
    let train = eng.train(&[Part::Connector, Part::Llm]);
    let reference = eng.frozen_copy(start.model.valid(), &train)?;
    let policy = steps::policy(&start.model, resume.as_deref(), device)?;
    let n_good = examples.iter().filter(|e| e.0.label).count();
    let what = format!(
        "kto (beta {}): {} examples ({n_good} desirable), {per_epoch} steps/epoch",
        spec.beta,
        examples.len()
    );
    let mut model = eng.start(policy, total, resume.as_deref(), &train, &what)?;
    let save = |m: &Llava, out: &Path| {
        export(m, &start.text, &start.processor, Some(&template), None, out)
    };
    // One micro-batch: its rows, the reference's log-probs, the KL rows' log-probs under policy and reference.
    let prepare = |chunk: &[&Example], policy: &Llava| -> Result<_> {
        let rows: Vec<&Encoded> = chunk.iter().map(|e| &e.1).collect();
        let mb = SeqBatch::new(&rows, &start, pack);
        let refs = logps(&reference, &mb, &inner)?;
        let kl = kl_rows(chunk, &start, &template, spec.max_len, &key)?;
        let kl_mb = SeqBatch::new(&kl.iter().collect::<Vec<_>>(), &start, pack);
        let (kp, kr) = (
            logps(policy, &kl_mb, &inner)?,
            logps(&reference, &kl_mb, &inner)?,
        );
        let labels: Vec<bool> = chunk.iter().map(|e| e.0.label).collect();
        Ok((mb, refs, kp, kr, labels))
    };
    let mut logged = vec![0.0f64; 10];
    let ckpt = spec.checkpoint_activations;
    // the held-out examples' loss and rewards (at the end, and every `eval_every` steps)
    let evaluate = |eng: &mut Engine, model: &Llava, step: usize| -> Result<()> {
        if heldout.is_empty() {
            return Ok(());
        }
        let valid = model.valid();
        let mut s = vec![0.0f64; 10];
        for chunk in heldout.chunks(spec.batch.micro) {
            let chunk: Vec<&Example> = chunk.iter().collect();
            let (mb, refs, kp, kr, labels) = prepare(&chunk, &valid)?;
            let lp = logps(&valid, &mb, &inner)?;
            let lpt = float_tensor(lp.clone(), [lp.len()], &inner);
            let (losses, z) = kto_losses(&k, lpt, &refs, &kp, &kr, &labels, &inner);
            let rho: Vec<f64> = lp.iter().zip(&refs).map(|(p, r)| (p - r) as f64).collect();
            for (a, b) in s
                .iter_mut()
                .zip(sums(&k, &to_vec(losses), &rho, &lp, &labels, z))
            {
                *a += b;
            }
        }
        let mut line = json(&s);
        line["stage"] = eng.name.into();
        line["step"] = step.into();
        line["heldout"] = true.into();
        eng.note(&format!(
            "step {step}: held-out examples: loss {:.4}, rewards chosen {:.3} / rejected {:.3}",
            line["loss"], line["rewards/chosen"], line["rewards/rejected"]
        ));
        eng.metrics.write(line)?;
        Ok(())
    };
    for step in eng.range() {
        eng.begin(step);
        let batch = batches.at(step);
        let chunks: Vec<&[usize]> = batch.chunks(spec.batch.micro).collect();
        let up = eng.accumulate(model, step, chunks.len(), 10, |c, m| {
            let chunk: Vec<&Example> = chunks[c].iter().map(|&i| &examples[i]).collect();
            let (mb, refs, kp, kr, labels) = prepare(&chunk, &m.valid())?;
            let input = to_input(&mb.mb, device)?;
            let tail = |hidden| -> Result<_> {
                let lp = mb.logps(hidden, |h| m.language_model.logits(h));
                let (losses, z) = kto_losses(&k, lp.clone(), &refs, &kp, &kr, &labels, device);
                let l = losses.clone().sum().div_scalar(batch.len() as f64);
                Ok((l, (losses, lp, z)))
            };
            let (loss, grads, (losses, lp, z)) = hidden_backward(m, m, &input, ckpt, tail)?;
            let lp = to_vec(lp);
            let rho: Vec<f64> = lp.iter().zip(&refs).map(|(p, r)| (p - r) as f64).collect();
            let sums = sums(&k, &to_vec(losses), &rho, &lp, &labels, z);
            Ok(Micro { loss, grads, sums })
        })?;
        for (a, b) in logged.iter_mut().zip(&up.sums) {
            *a += b;
        }
        model = up.model;
        eng.end(
            &model,
            step,
            up.loss,
            up.norm,
            None,
            || json(&std::mem::replace(&mut logged, vec![0.0; 10])),
            |tmp| save(&model, tmp),
        )?;
        if eng.eval_due(step) {
            evaluate(&mut eng, &model, step + 1)?;
        }
    }
    evaluate(&mut eng, &model, total)?;
    let model = eng.finish_model(model, save, |_, _| Ok(()))?;
    Ok(Built { model, ..start })
}

#[cfg(test)]
mod tests {
    use super::{Kto, kto_losses};

    /// TRL's `kto_loss` in f64: kl = max(0, mean(policy_KL_logps − reference_KL_logps)); desirable
    /// 1 − σ(β(ρ − kl)), undesirable 1 − σ(β(kl − ρ)), times `desirable_weight` / `undesirable_weight`.
    #[test]
    fn kto_losses_follow_trl() {
        let device = burn::tensor::Device::flex();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let k = Kto {
            beta: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 1.33,
        };
        let logp = [-10.0f32, -12.5, -7.25, -20.0];
        let refs = [-11.0f32, -12.0, -7.0, -18.5];
        let labels = [true, false, true, false];
        for (kp, kr, want_z) in [
            // mean(−9 + 10, −13 + 12.5, −8 + 7.5, −15 + 16) = (1 − 0.5 − 0.5 + 1) / 4 = 0.25
            (
                [-9.0f32, -13.0, -8.0, -15.0],
                [-10.0f32, -12.5, -7.5, -16.0],
                0.25,
            ),
            // a negative mean is clamped to 0
            (
                [-12.0f32, -13.0, -8.0, -15.0],
                [-10.0f32, -12.0, -7.0, -14.0],
                0.0,
            ),
        ] {
            let lp = crate::zoo::layers::float_tensor(logp.to_vec(), [4], &device);
            let (l, z) = kto_losses(&k, lp, &refs, &kp, &kr, &labels, &device);
            assert!((z - want_z).abs() < 1e-12, "{z}");
            let got = crate::zoo::layers::to_vec(l);
            for i in 0..4 {
                let rho = (logp[i] - refs[i]) as f64;
                let want = if labels[i] {
                    k.desirable_weight * (1.0 - sig(k.beta * (rho - z)))
                } else {
                    k.undesirable_weight * (1.0 - sig(k.beta * (z - rho)))
                };
                assert!(
                    (got[i] as f64 - want).abs() < 1e-6,
                    "{i}: {} vs {want}",
                    got[i]
                );
            }
        }
    }
}
