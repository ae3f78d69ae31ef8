//! Step bookkeeping shared by the stages that run their own loops (dpo, reward, grpo, ppo): which items make the
//! global batch of a step (a pure function of seed and epoch, so a resumed run sees the same batches), the fault
//! point the resume tests kill at, and run-state checkpoints.
use burn::module::Module;
use std::path::{Path, PathBuf};

use super::checkpoints;
use super::optim::{self, Groups};
use crate::data::loader::Order;
use crate::error::{Error, Result};
use crate::recipe::schema::Mix;

pub struct Batches {
    order: Order,
    pub per_epoch: usize,
    pub total: usize,
    cache: Option<(usize, Vec<Vec<usize>>)>,
}

impl Batches {
    /// Batches of `global` items drawn from `len.len()` items (grouped by modality and length like the trainer's).
    /// `what` names the items in the error when there are too few.
    pub fn new(
        key: &str,
        what: &str,
        global: usize,
        seed: u64,
        has_image: Vec<bool>,
        len: Vec<usize>,
        epochs: f64,
        max_steps: Option<usize>,
    ) -> Result<Self> {
        let n = len.len();
        let order = Order {
            mix: Mix::Mixed,
            global,
            seed,
            sources: vec![((0..n).collect(), 1.0)],
            has_image,
            len,
        };
        let per_epoch = order.steps_per_epoch();
        let total = max_steps.unwrap_or((epochs * per_epoch as f64).floor() as usize);
        if total == 0 {
            return Err(Error::input(format!(
                "{key}: {n} usable {what} make no full global batch of {global}; lower batch.global or add data"
            )));
        }
        Ok(Batches {
            order,
            per_epoch,
            total,
            cache: None,
        })
    }

    /// Item indices of step `step`'s global batch.
    pub fn at(&mut self, step: usize) -> Vec<usize> {
        let epoch = step / self.per_epoch;
        if self.cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.cache = Some((epoch, self.order.epoch(epoch)));
        }
        self.cache.as_ref().unwrap().1[step % self.per_epoch].clone()
    }
}

/// Dies abruptly (no unwinding, no cleanup, as SIGKILL would) when `MITUNE_FAULT_ABORT_AT_STEP` names this stage
/// and step: the resume tests' kill.
pub fn fault_point(stage: &str, done: usize) {
    if std::env::var("MITUNE_FAULT_ABORT_AT_STEP").ok() == Some(format!("{stage}:{done}")) {
        std::process::abort();
    }
}

/// Writes a run-state checkpoint: `write` saves the model into the folder, then the optimizer moments and state.
pub fn checkpoint<M: Module>(
    stage_dir: &Path,
    model: &M,
    groups: &Groups,
    done: usize,
    total: usize,
    keep_last: usize,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    checkpoints::save(
        stage_dir,
        &optim::state(model, done, total),
        |tmp| {
            write(tmp)?;
            groups.save(tmp)
        },
        keep_last,
    )
}

/// The stop for a non-finite loss: nothing saved, the way out named.
/// Test hook: `MITUNE_FAULT_NAN_AT_STEP=STAGE:N` turns step N's loss into NaN, so a test sees every stage kind stop
/// on a non-finite loss before its optimizer touches the weights.
pub fn poison(stage: &str, done: usize, loss: f64) -> f64 {
    if std::env::var("MITUNE_FAULT_NAN_AT_STEP").ok() == Some(format!("{stage}:{done}")) {
        f64::NAN
    } else {
        loss
    }
}

pub fn non_finite(key: &str, loss: f64, step: usize) -> Error {
    Error::input(format!(
        "{key}: loss is {loss} at step {step}; stopped without saving. Lower the learning rate (or beta), or check this step's data."
    ))
}

/// The LLaVA policy a stage trains: the starting model, or on resume the checkpoint's weights and optimizer
/// moments; frozen outside `train`. Returns the model and the first step to run.
#[allow(clippy::too_many_arguments)]
pub fn policy(
    start: &crate::zoo::mllm::Llava,
    resume: Option<&Path>,
    groups: &mut Groups,
    train: &[String],
    stage: &str,
    total: usize,
    device: &burn::tensor::Device,
) -> Result<(crate::zoo::mllm::Llava, usize)> {
    let mut model = start.clone();
    let mut first = 0;
    if let Some(ck) = resume {
        model = super::build::load_dir(ck, device)?.model;
        (model, first) = groups.resume(model, ck)?;
        eprintln!(
            "[{stage}] resuming at step {first}/{total} from {}",
            ck.display()
        );
    }
    Ok((groups.select(model, train, stage)?, first))
}
