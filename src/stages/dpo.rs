//! `kind = "dpo"`: preference optimisation on chosen/rejected pairs (DPO and its variants, `pref_loss`).
//!
//! Each forward holds a micro-batch's chosen rows then its rejected rows; a response's log-prob is the sum over
//! its tokens (the last assistant turn only; earlier turns are context). The reference is the stage's starting
//! model: a frozen copy evaluated beside the policy, or its log-probs for every pair computed once and cached in
//! `<stage>/reference_logps.json` (no second model in memory; a resumed run reads the cache). Reference-free
//! losses (SimPO, ORPO) use neither. Metrics per logged step use TRL's names: loss, rewards/chosen,
//! rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::backward::{hidden_backward, to_input};
use super::batches::pack_cap;
use super::pairs::{self, EncPair, PrefSetup, SeqBatch, setup};
use super::pref_loss::{PairLogps, PrefLoss, losses};
use super::steps::{self, Engine, Micro, StageRun};
use crate::error::{Error, Result, read_json};
use crate::model::{Built, export};
use crate::recipe::schema::{Part, PrefStage, Reference};
use crate::zoo::layers::{float_tensor, to_vec};
use crate::zoo::mllm::Llava;

/// Reference log-probs (chosen, rejected) of every pair, computed with `reference` in micro-batches.
fn reference_table(
    reference: &Llava,
    pairs: &[EncPair],
    b: &Built,
    micro: usize,
    pack: Option<usize>,
    device: &Device,
) -> Result<Vec<(f32, f32)>> {
    let mut out = vec![];
    for chunk in pairs.chunks(micro.max(1)) {
        let chunk: Vec<&EncPair> = chunk.iter().collect();
        let l = pairs::pairs(&chunk, b, pack).logps_of(reference, device)?;
        let v = to_vec(l);
        let m = chunk.len();
        out.extend((0..m).map(|k| (v[k], v[m + k])));
    }
    Ok(out)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Cache {
    train: Vec<(f32, f32)>,
    heldout: Vec<(f32, f32)>,
}

enum RefModel {
    None,
    Frozen(Llava),
    Cached(Cache),
}

/// Per-step sums for the logged metrics.
#[derive(Default)]
struct Sums {
    n: usize,
    loss: f64,
    chosen: f64,
    rejected: f64,
    correct: usize,
    logp_c: f64,
    logp_r: f64,
    /// tokens computed (padding included) and the sequences' own tokens
    tokens: f64,
    real: f64,
}

impl Sums {
    fn add(&mut self, l: &[f32], c: &[f32], r: &[f32], pc: &[f32], pr: &[f32]) {
        for k in 0..l.len() {
            self.n += 1;
            self.loss += l[k] as f64;
            self.chosen += c[k] as f64;
            self.rejected += r[k] as f64;
            self.correct += usize::from(c[k] > r[k]);
            self.logp_c += pc[k] as f64;
            self.logp_r += pr[k] as f64;
        }
    }
    /// As numbers to sum over the ranks of a data-parallel job (`from_sums` reads them back).
    fn to_sums(&self) -> [f64; 9] {
        [
            self.n as f64,
            self.loss,
            self.chosen,
            self.rejected,
            self.correct as f64,
            self.logp_c,
            self.logp_r,
            self.tokens,
            self.real,
        ]
    }
    fn add_sums(&mut self, s: &[f64]) {
        self.n += s[0] as usize;
        self.loss += s[1];
        self.chosen += s[2];
        self.rejected += s[3];
        self.correct += s[4] as usize;
        self.logp_c += s[5];
        self.logp_r += s[6];
        self.tokens += s[7];
        self.real += s[8];
    }
    /// The logged means since the last line (the engine adds stage, step, lr, grad_norm).
    fn json(&self) -> serde_json::Value {
        let n = self.n.max(1) as f64;
        serde_json::json!({
            "loss": self.loss / n,
            "rewards/chosen": self.chosen / n, "rewards/rejected": self.rejected / n,
            "rewards/margins": (self.chosen - self.rejected) / n,
            "rewards/accuracies": self.correct as f64 / n,
            "logps/chosen": self.logp_c / n, "logps/rejected": self.logp_r / n,
            // share of the computed tokens that are padding (pack = true lowers it)
            "padding": 1.0 - self.real / self.tokens.max(1.0),
        })
    }
}

/// Loss, rewards and policy log-probs of one micro-batch of pairs (`pb` = `pairs::pairs(chunk)`), from the policy's
/// final hidden states over it; the reference's log-probs come from `reference` or the cache.
#[allow(clippy::too_many_arguments)]
fn pair_losses(
    kind: &PrefLoss,
    policy: &Llava,
    hidden: Tensor<3>,
    pb: &SeqBatch,
    chunk: &[&EncPair],
    reference: &RefModel,
    cached: &[(f32, f32)],
    device: &Device,
) -> Result<(Tensor<1>, Tensor<1>, Tensor<1>, Tensor<1>, Tensor<1>)> {
    let m = chunk.len();
    let head = |h| policy.language_model.logits(h);
    let rows_logp = pb.logps(hidden, head);
    let counts = pb.counts();
    let pc = rows_logp.clone().slice([0..m]);
    let pr = rows_logp.slice([m..2 * m]);
    let (rc, rr): (Vec<f32>, Vec<f32>) = match reference {
        RefModel::None => (vec![0.0; m], vec![0.0; m]),
        RefModel::Frozen(r) => {
            let l = pb.logps_of(r, &device.clone().inner())?;
            let v = to_vec(l);
            (v[..m].to_vec(), v[m..].to_vec())
        }
        RefModel::Cached(_) => chunk.iter().map(|p| cached[p.0.index]).unzip(),
    };
    let x = PairLogps {
        pc: pc.clone(),
        pr: pr.clone(),
        rc: float_tensor(rc, [m], device),
        rr: float_tensor(rr, [m], device),
        nc: float_tensor(counts[..m].to_vec(), [m], device),
        nr: float_tensor(counts[m..].to_vec(), [m], device),
    };
    let (l, c, r) = losses(kind, &x);
    Ok((l, c, r, pc, pr))
}

/// Runs the stage from `start` (the reference; also the policy unless `resume` names a checkpoint).
pub fn run(
    ctx: StageRun,
    spec: &PrefStage,
    start: Built,
    resume: Option<PathBuf>,
) -> Result<Built> {
    let mut eng = Engine::new(ctx, &start.text)?;
    let loss_kind = spec.loss.unwrap_or_default();
    let PrefSetup {
        pairs,
        heldout,
        mut batches,
    } = setup(&eng, spec, &start)?;
    let (per_epoch, total) = (batches.per_epoch, batches.total);
    let pack = pack_cap(spec.pack, spec.max_len, &start.model, &eng.key)?;
    let device = eng.device;
    let inner = device.clone().inner();
    let t_ref = Instant::now();
    let train = eng.train(&[Part::Connector, Part::Llm]);
    let reference = match (
        loss_kind.needs_reference(),
        spec.reference.unwrap_or_default(),
    ) {
        (false, _) => RefModel::None,
        (true, Reference::Frozen) => {
            RefModel::Frozen(eng.frozen_copy(start.model.valid(), &train)?)
        }
        (true, Reference::Cached) => {
            let f = eng.dir.join("reference_logps.json");
            let cache = if f.exists() {
                read_json(&f)?
            } else {
                let r = eng.frozen_copy(start.model.valid(), &train)?;
                let c = Cache {
                    train: reference_table(&r, &pairs, &start, spec.batch.micro, pack, &inner)?,
                    heldout: reference_table(&r, &heldout, &start, spec.batch.micro, pack, &inner)?,
                };
                if crate::dist::writer() {
                    crate::error::write_json_atomic(&f, &c)?;
                }
                crate::say!(
                    "[{}] reference log-probs of {} pairs cached in {:.1}s",
                    eng.name,
                    pairs.len() + heldout.len(),
                    t_ref.elapsed().as_secs_f64()
                );
                c
            };
            if cache.train.len() != pairs.len() || cache.heldout.len() != heldout.len() {
                return Err(Error::file(
                    &f,
                    "the cached reference log-probs do not match the data; delete the file to recompute them",
                ));
            }
            RefModel::Cached(cache)
        }
    };
    let (train_cache, held_cache): (&[(f32, f32)], &[(f32, f32)]) = match &reference {
        RefModel::Cached(c) => (&c.train, &c.heldout),
        _ => (&[], &[]),
    };

    let policy = steps::policy(&start.model, resume.as_deref(), device)?;
    let what = format!(
        "dpo ({loss_kind:?}, reference {:?}): {} pairs, {per_epoch} steps/epoch",
        loss_kind
            .needs_reference()
            .then(|| spec.reference.unwrap_or_default()),
        pairs.len(),
    );
    let mut model = eng.start(policy, total, resume.as_deref(), &train, &what)?;
    let template = eng.template.clone();
    let save = |m: &Llava, out: &Path| {
        export(m, &start.text, &start.processor, Some(&template), None, out)
    };
    // the held-out pairs' losses and accuracy (at the end, and every `eval_every` steps)
    let evaluate = |eng: &mut Engine, model: &Llava, step: usize| -> Result<()> {
        if heldout.is_empty() {
            return Ok(());
        }
        let valid = model.valid();
        let mut s = Sums::default();
        for chunk in heldout.chunks(spec.batch.micro) {
            let chunk: Vec<&EncPair> = chunk.iter().collect();
            let pb = pairs::pairs(&chunk, &start, pack);
            let hidden = valid.hidden(&to_input(&pb.mb, &inner)?)?;
            let (l, c, rj, pc, pr) = pair_losses(
                &loss_kind, &valid, hidden, &pb, &chunk, &reference, held_cache, &inner,
            )?;
            s.add(
                &to_vec(l),
                &to_vec(c),
                &to_vec(rj),
                &to_vec(pc),
                &to_vec(pr),
            );
            s.tokens += pb.mb.tokens as f64;
            s.real += pb.mb.real as f64;
        }
        let mut line = s.json();
        line["stage"] = eng.name.into();
        line["step"] = step.into();
        line["heldout"] = true.into();
        eng.note(&format!(
            "step {step}: held-out pairs: accuracy {:.1}%, margin {:.3}",
            100.0 * s.correct as f64 / s.n.max(1) as f64,
            (s.chosen - s.rejected) / s.n.max(1) as f64
        ));
        eng.metrics.write(line)?;
        Ok(())
    };
    let mut sums = Sums::default();
    let ckpt = spec.checkpoint_activations;
    for step in eng.range() {
        eng.begin(step);
        let batch = batches.at(step);
        let chunks: Vec<&[usize]> = batch.chunks(spec.batch.micro).collect();
        let up = eng.accumulate(model, step, chunks.len(), 9, |k, model| {
            let chunk: Vec<&EncPair> = chunks[k].iter().map(|&i| &pairs[i]).collect();
            let pb = pairs::pairs(&chunk, &start, pack);
            let input = to_input(&pb.mb, device)?;
            let tail = |hidden| -> Result<_> {
                let parts = pair_losses(
                    &loss_kind,
                    model,
                    hidden,
                    &pb,
                    &chunk,
                    &reference,
                    train_cache,
                    device,
                )?;
                Ok((parts.0.clone().sum().div_scalar(batch.len() as f64), parts))
            };
            let (loss, grads, (l, c, r, pc, pr)) =
                hidden_backward(model, model, &input, ckpt, tail)?;
            let mut mine = Sums::default();
            mine.add(&to_vec(l), &to_vec(c), &to_vec(r), &to_vec(pc), &to_vec(pr));
            (mine.tokens, mine.real) = (pb.mb.tokens as f64, pb.mb.real as f64);
            let sums = mine.to_sums().to_vec();
            Ok(Micro { loss, grads, sums })
        })?;
        sums.add_sums(&up.sums);
        model = up.model;
        eng.end(
            &model,
            step,
            up.loss,
            up.norm,
            None,
            || std::mem::take(&mut sums).json(),
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
