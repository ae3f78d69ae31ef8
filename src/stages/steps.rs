//! The step engine every training stage runs its loop through (`Engine`): the prologue, the step body
//! (`accumulate`), adapters, the step tail, checkpoints and the final save; and the fault points the crash tests
//! use.
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{DType, Device};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::adapters::{self, Adapted};
use super::log::{Metrics, Progress};
use super::optim::{self, Groups};
use super::{checkpoints, schedule};
use crate::data::tokenizer::TextProcessor;
use crate::error::{Error, Result};
use crate::recipe::schema::{FrozenDtype, Part, Precision, StageSpec, Steps};
use crate::zoo::layers::precision;
use crate::zoo::mllm::Backbone;

/// What the pipeline hands a training stage: its name and spec, its folder, the recipe's seed, the device and the
/// run's metrics log.
pub struct StageRun<'a> {
    pub name: &'a str,
    pub spec: &'a StageSpec,
    pub dir: PathBuf,
    pub seed: u64,
    pub device: &'a Device,
    pub metrics: &'a mut Metrics,
}

/// Dies abruptly (no unwinding, no cleanup, as SIGKILL would) when `MITUNE_FAULT_ABORT_AT_STEP` names this
/// point: `STAGE:N` after step N's update, `STAGE:N:checkpoint` in the middle of writing step N's checkpoint
/// (model written, state not yet): the resume tests' kills. `MITUNE_FAULT_STALL_AT_STEP` hangs there instead,
/// `MITUNE_FAULT_RANK=R` picks one rank of a data-parallel job.
pub fn fault_point(stage: &str, done: usize, at: Option<&str>) {
    let want = match at {
        Some(a) => format!("{stage}:{done}:{a}"),
        None => format!("{stage}:{done}"),
    };
    // `MITUNE_FAULT_RANK=R` limits it to rank R of a data-parallel job (one rank dies, the others must stop)
    let rank_ok = std::env::var("MITUNE_FAULT_RANK")
        .map_or(true, |r| r == crate::dist::world().rank.to_string());
    if std::env::var("MITUNE_FAULT_ABORT_AT_STEP").ok().as_ref() == Some(&want) && rank_ok {
        std::process::abort();
    }
    // `MITUNE_FAULT_STALL_AT_STEP`: hangs instead (a stuck rank: the others' collective timeout must end the job)
    if std::env::var("MITUNE_FAULT_STALL_AT_STEP").ok() == Some(want) && rank_ok {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// The LLaVA a policy stage (dpo, grpo) starts its weights from: the checkpoint's on resume, else the stage's
/// starting model (which stays the reference either way).
pub fn policy(
    start: &crate::zoo::mllm::Llava,
    resume: Option<&Path>,
    device: &Device,
) -> Result<crate::zoo::mllm::Llava> {
    match resume {
        Some(ck) => Ok(crate::model::load_dir(ck, device)?.model),
        None => Ok(start.clone()),
    }
}

/// Test hook: `MITUNE_FAULT_NAN_AT_STEP=STAGE:N` turns step N's loss into NaN, so a test sees every stage kind stop
/// on a non-finite loss before its optimizer touches the weights.
fn poison(stage: &str, done: usize, loss: f64) -> f64 {
    if std::env::var("MITUNE_FAULT_NAN_AT_STEP").ok() == Some(format!("{stage}:{done}")) {
        f64::NAN
    } else {
        loss
    }
}

/// The one step engine of every training stage (align, instruct, pretrain, dpo, reward, grpo, ppo). It owns what
/// must not differ between them: the prologue (the stage's data seed, its template, optimizer groups, resume of
/// parameter ids and moments, which parameters learn) and the tail of each step (non-finite check *before* the
/// update, the fault point, progress, the metrics line, checkpoint) and the end (final model, done marker).
/// Each stage file keeps its own loss — what one micro-batch computes — in view and calls it:
///
/// ```text
/// let mut eng = Engine::new(ctx, &text)?;                 // seed, template, groups, precision
/// ... read data with eng.seed / eng.template, count steps ...
/// model = eng.start(model, total, resume, &train, what)?;  // adapters, resume ids + moments, freeze, one line
/// for step in eng.range() {
///     eng.begin(step);
///     let up = eng.accumulate(model, step, n_micro, width, |i, m| {
///         ... micro-batch i: loss, gradients (backward::hidden_backward), numbers to log ...
///     })?;                                                  // once per optimizer update
///     eng.end(&up.model, step, up.loss, up.norm, tok_s, || line, |tmp| save(&up.model, tmp))?;
/// }
/// eng.finish_model(model, save, |m, dir| ...)?;            // model/ (merged), adapter/, base/, done marker
/// ```
pub struct Engine<'a> {
    pub name: &'a str,
    /// `stages.NAME`, how errors name the stage.
    pub key: String,
    pub dir: PathBuf,
    pub device: &'a Device,
    pub metrics: &'a mut Metrics,
    /// The stage's data seed (`stages.NAME.seed`, else the recipe's); the device seed is set by the runner.
    pub seed: u64,
    /// The chat template's source the stage trains with.
    pub template: String,
    pub groups: Groups,
    pub first: usize,
    pub total: usize,
    s: Steps<'a>,
    progress: Option<Progress>,
    last_good: Option<PathBuf>,
    t0: Instant,
    factor: f64,
    /// this step's all-reduce: seconds (waiting for the slowest rank included) and bytes sent per rank
    comm: Option<(f64, usize)>,
    /// Storage dtype of frozen Linear/Embedding weights (`frozen_dtype`; also for frozen reference copies).
    pub frozen: DType,
    /// bf16 products while the stage runs (`precision = "bf16-mixed" | "bf16"`); None in f32.
    _autocast: precision::Autocast,
    /// The stage's adapters once `start` attached them (`adapter = {...}`).
    adapted: Option<Adapted>,
}

/// What one micro-batch gives the engine: the value of its loss (its share of the step's loss), its gradients,
/// and the stage's numbers to log (summed over the micro-batches and the ranks).
pub struct Micro {
    pub loss: f64,
    pub grads: GradientsParams,
    pub sums: Vec<f64>,
}

/// One optimizer update: the model after it, the gradient norm before clipping, the update's loss and the
/// stage's sums over every micro-batch of every rank.
pub struct Update<M> {
    pub model: M,
    pub norm: f64,
    pub loss: f64,
    pub sums: Vec<f64>,
}

/// A stage's `precision` and `frozen_dtype` → (the compute dtype of matrix products, None = f32; the storage
/// dtype of frozen weights), checked against what `device` can compute. (`precision = "bf16"` with
/// `frozen_dtype = "f32"` is refused by the recipe's validation.)
pub fn precision_of(
    p: Precision,
    frozen: Option<FrozenDtype>,
    key: &str,
    device: &Device,
) -> Result<(Option<DType>, DType)> {
    let compute = match p {
        Precision::F32 => None,
        Precision::Bf16Mixed | Precision::Bf16 => Some(DType::BF16),
    };
    let frozen = match (p, frozen) {
        (Precision::Bf16, _) | (_, Some(FrozenDtype::Bf16)) => DType::BF16,
        _ => DType::F32,
    };
    if (compute.is_some() || frozen == DType::BF16) && !device.supports_dtype(DType::BF16) {
        return Err(Error::input(format!(
            "{key}: this device (MITUNE_DEVICE={}) has no bf16 tensors (burn reports none: wgpu's WGSL shaders \
             have none, and Vulkan has them only where the driver exposes bf16 shaders): set precision = \"f32\" \
             and no frozen_dtype, or run on flex (the CPU) or cuda",
            std::env::var("MITUNE_DEVICE").unwrap_or_else(|_| "flex".into())
        )));
    }
    Ok((compute, frozen))
}

impl<'a> Engine<'a> {
    /// The first half of the prologue, before the stage reads its data (which needs seed and template).
    pub fn new(ctx: StageRun<'a>, text: &TextProcessor) -> Result<Self> {
        let s = ctx
            .spec
            .steps()
            .ok_or_else(|| Error::input(format!("stages.{}: not a training stage", ctx.name)))?;
        let key = format!("stages.{}", ctx.name);
        let template = crate::data::templates::training_source(s.template, text)
            .map_err(|m| Error::input(format!("{key}.template: {m}")))?;
        let (compute, frozen) = precision_of(s.precision, s.frozen_dtype, &key, ctx.device)?;
        Ok(Engine {
            name: ctx.name,
            groups: Groups::new(s.optim, ctx.name)?,
            key,
            dir: ctx.dir,
            device: ctx.device,
            metrics: ctx.metrics,
            seed: s.seed.unwrap_or(ctx.seed),
            template,
            first: 0,
            total: 0,
            s,
            progress: None,
            last_good: None,
            t0: Instant::now(),
            factor: 1.0,
            comm: None,
            frozen,
            _autocast: precision::autocast(compute),
            adapted: None,
        })
    }

    /// Whether the stage evaluates its held-out set after step `step` (0-based, as the loop counts): every
    /// `eval_every` steps, short of the last (the stage's end evaluates after it anyway).
    pub fn eval_due(&self, step: usize) -> bool {
        let done = step + 1;
        self.s
            .eval_every
            .is_some_and(|e| e > 0 && done % e == 0 && done < self.total)
    }

    /// The parts that learn in full: the recipe's `train`, else the stage kind's default (with adapters, only
    /// the connector and a stage's own head of it: `adapters::default_parts`).
    pub fn train(&self, default: &[Part]) -> Vec<String> {
        match (self.s.train, self.s.adapter) {
            (Some(t), _) => t.to_vec(),
            (None, Some(a)) => adapters::default_parts(default, a)
                .iter()
                .map(|p| p.name().to_string())
                .collect(),
            (None, None) => default.iter().map(|p| p.name().to_string()).collect(),
        }
    }

    /// The second half, once the data fixed `total`: `model` holds the weights to start from (the checkpoint's on
    /// resume, loaded by the stage, which knows its own extra files); attaches the stage's adapters (the
    /// checkpoint's on resume), restores parameter ids and optimizer moments from `resume`, freezes all but
    /// `train` (and the adapters), prints the stage's line (`what` says what it trains on).
    pub fn start<M: Backbone>(
        &mut self,
        model: M,
        total: usize,
        resume: Option<&Path>,
        train: &[String],
        what: &str,
    ) -> Result<M> {
        self.total = total;
        let mut model = model;
        let mut train = train.to_vec();
        if let Some(a) = self.s.adapter {
            let adapted;
            (model, adapted) = Adapted::attach(model, a, &train, resume, &self.key, self.device)?;
            train.push(adapters::FACTORS.into());
            self.adapted = Some(adapted);
        }
        if let Some(ck) = resume {
            (model, self.first) = self.groups.resume(model, ck)?;
            crate::say!(
                "[{}] resuming at step {}/{total} from {}",
                self.name,
                self.first,
                ck.display()
            );
            self.last_good = Some(ck.to_path_buf());
        }
        let model = self.groups.select(model, &train, self.name)?;
        // trained weights in f32 (a previous stage may hand over bf16-stored frozen ones), frozen per frozen_dtype
        let model = precision::store(model, self.frozen);
        if precision::compute().is_some() || self.frozen == DType::BF16 {
            crate::say!(
                "[{}] precision: products in {}, frozen Linear/Embedding weights in {}; parameters hold {:.1} MB",
                self.name,
                if precision::compute().is_some() {
                    "bf16"
                } else {
                    "f32"
                },
                if self.frozen == DType::BF16 {
                    "bf16"
                } else {
                    "f32"
                },
                precision::param_bytes(&model) as f64 / 1e6
            );
        }
        crate::say!(
            "[{}] {what}, {total} steps; training {} ({} of {} params)",
            self.name,
            train.join(", "),
            self.groups.n_train,
            self.groups.n_all
        );
        self.progress = Some(Progress::new(self.name, self.first, total));
        Ok(model)
    }

    /// A frozen copy of the stage's starting model (`model`, on the inner backend) — DPO's, GRPO's and PPO's
    /// reference — stored to compute exactly what the policy computes at its start: the weights `train` leaves
    /// frozen in the policy's frozen dtype, trained Embedding tables and other parameters in f32, and trained
    /// Linear weights in bf16 under bf16 products (the policy casts them to bf16 for every product anyway).
    pub fn frozen_copy<M: Module>(&self, model: M, train: &[String]) -> Result<M> {
        let trained: std::collections::HashSet<String> =
            super::params::select(&super::params::list(&model), train)
                .map_err(|m| Error::input(format!("{}.{m}", self.key)))?
                .into_iter()
                .map(|p| p.path)
                .collect();
        let compute = precision::compute();
        let frozen = self.frozen;
        Ok(precision::store_with(model, |path, kind, _| match kind {
            precision::Kind::Linear if compute == Some(DType::BF16) => DType::BF16,
            precision::Kind::Linear | precision::Kind::Embedding if !trained.contains(path) => {
                frozen
            }
            _ => DType::F32,
        }))
    }

    /// The steps left to run.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.first..self.total
    }

    /// Starts step `step` (0-based): its clock and learning-rate factor.
    pub fn begin(&mut self, step: usize) {
        self.t0 = Instant::now();
        self.factor = schedule::factor(self.s.schedule, step, self.total);
    }

    /// Seconds since `begin` of this step.
    pub fn step_secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Data parallel (`mpirun`, `crate::dist`): sums this step's gradients and `scalars` (the loss and counts
    /// of this rank's share of the global batch) over the ranks, so every rank applies the same update of the
    /// whole global batch. Returns `grads` untouched in one process.
    fn all_reduce<M: Module>(
        &mut self,
        model: &M,
        grads: GradientsParams,
        scalars: &mut [f64],
    ) -> GradientsParams {
        if !crate::dist::parallel() {
            return grads;
        }
        let t = Instant::now();
        crate::dist::sum_f64(scalars, "the loss all-reduce");
        let (grads, bytes) = self.groups.all_reduce(model, grads);
        self.comm = Some((t.elapsed().as_secs_f64(), bytes));
        grads
    }

    /// One optimizer update of step `step` with `loss` (the value the gradients came from): refused before it
    /// touches the weights when the loss is not finite. Returns the model and the gradient norm before clipping.
    fn update<M: Module>(
        &mut self,
        model: M,
        step: usize,
        loss: f64,
        grads: GradientsParams,
    ) -> Result<(M, f64)> {
        let loss = poison(self.name, step + 1, loss);
        if !loss.is_finite() {
            return Err(Error::input(format!(
                "{}: loss is {loss} at step {} (lr {:.3e}); stopped without saving. The last good checkpoint is {}. Lower the learning rate (or beta), or check this step's data.",
                self.key,
                step + 1,
                self.groups.lr() * self.factor,
                self.last_good
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none (the stage's start)".into())
            )));
        }
        Ok(self
            .groups
            .step(model, grads, self.s.clip_grad_norm, self.factor))
    }

    /// One optimizer update made of `n` micro-batches — the step body every stage shares: this rank takes its
    /// share of them (`crate::dist::shard`: every N-th), `micro(i, &model)` computes micro-batch i (its loss
    /// value, gradients and `width` numbers to log), the gradients are accumulated, then gradients, loss and
    /// numbers are summed over the ranks, and the update is made — refused before it touches the weights when
    /// the loss is not finite.
    pub fn accumulate<M: Module>(
        &mut self,
        model: M,
        step: usize,
        n: usize,
        width: usize,
        mut micro: impl FnMut(usize, &M) -> Result<Micro>,
    ) -> Result<Update<M>> {
        let mut acc = GradientsAccumulator::<M>::new();
        // [loss, the stage's numbers...] of this rank's micro-batches (all of them in one process)
        let mut s = vec![0.0f64; 1 + width];
        for i in crate::dist::shard(n) {
            let m = micro(i, &model)?;
            s[0] += m.loss;
            for (a, b) in s[1..].iter_mut().zip(&m.sums) {
                *a += b;
            }
            acc.accumulate(&model, m.grads);
        }
        let grads = self.all_reduce(&model, acc.grads(), &mut s);
        let loss = s[0];
        let (model, norm) = self.update(model, step, loss, grads)?;
        Ok(Update {
            model,
            norm,
            loss,
            sums: s.split_off(1),
        })
    }

    /// The tail of step `step`: the fault point, progress, the metrics line when due (the stage's `line` plus
    /// stage, step, lr, grad_norm, step_s; due every `log_every` steps, at step 1 and at the last), and a
    /// checkpoint every `save_every` steps (`write` saves the model's files into the folder it is given).
    #[allow(clippy::too_many_arguments)]
    pub fn end<M: Backbone>(
        &mut self,
        model: &M,
        step: usize,
        loss: f64,
        norm: f64,
        tok_s: Option<f64>,
        line: impl FnOnce() -> serde_json::Value,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let done = step + 1;
        fault_point(self.name, done, None);
        let lr = self.groups.lr() * self.factor;
        if let Some(p) = &mut self.progress {
            p.update(done, loss, lr, tok_s);
        }
        if done % self.s.log_every == 0 || done == self.total || done == 1 {
            let mut l = line();
            l["stage"] = self.name.into();
            l["step"] = done.into();
            l["lr"] = lr.into();
            l["grad_norm"] = norm.into();
            l["step_s"] = self.step_secs().into();
            if let Some((secs, bytes)) = self.comm {
                l["ranks"] = crate::dist::world().size.into();
                l["allreduce_s"] = secs.into();
                l["allreduce_bytes"] = bytes.into();
            }
            self.metrics.write(l)?;
        }
        if done % self.s.save_every == 0 && done < self.total {
            let last = self.last_good.clone();
            let dir = checkpoints::save(
                &self.dir,
                &optim::state(model, done, self.total),
                |tmp| {
                    write(tmp)?;
                    // the base weights (HF files skip adapters) + the adapter, as `start` reads them back
                    if let Some(a) = &self.adapted {
                        a.save(model, tmp, &tmp.join("adapter"))?;
                    }
                    fault_point(self.name, done, Some("checkpoint"));
                    self.groups.save(tmp)
                },
                self.s.keep_last,
            )
            .map_err(|e| {
                Error::input(format!(
                    "{}: the checkpoint of step {done} was not written: {e}. The last good checkpoint is {}; `--resume` continues from it.",
                    self.key,
                    last.map(|p| p.display().to_string())
                        .unwrap_or_else(|| "none (the stage restarts)".into())
                ))
            })?;
            self.last_good = Some(dir);
        }
        Ok(())
    }

    /// A message beside the progress bar.
    pub fn note(&self, msg: &str) {
        match &self.progress {
            Some(p) => p.note(msg),
            None => crate::say!("[{}] {msg}", self.name),
        }
    }

    /// Ends the stage with its final model: `save(model, dir)` writes a model's files into `dir`, `after(model,
    /// stage dir)` whatever else the stage releases. `<stage>/model/` holds the model — with adapters, merged
    /// (what later stages, generate and transformers load), beside `adapter/` (PEFT) over `base/` (unmerged).
    pub fn finish_model<M: Backbone>(
        mut self,
        model: M,
        save: impl Fn(&M, &Path) -> Result<()>,
        after: impl FnOnce(&M, &Path) -> Result<()>,
    ) -> Result<M> {
        let adapted = self.adapted.take();
        self.finish(|dir| {
            let m = match &adapted {
                Some(a) => {
                    let base = dir.join("base");
                    save(&model, &base)?;
                    a.save(&model, &base, &dir.join("adapter"))?;
                    Adapted::merge(model)?
                }
                None => model,
            };
            save(&m, &dir.join("model"))?;
            after(&m, dir)?;
            Ok(m)
        })
    }

    /// Ends the stage: `save` writes the final model into the stage's folder, then the done marker (a stage is done
    /// only once its model is complete).
    fn finish<T>(self, save: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
        if let Some(p) = &self.progress {
            p.finish();
        }
        let out = save(&self.dir)?;
        checkpoints::mark_done(&self.dir, self.total)?;
        // data parallel: rank 0 wrote the model; a later stage that starts from it (`init = { from_stage }`) reads
        // it on every rank
        crate::dist::barrier();
        Ok(out)
    }
}
