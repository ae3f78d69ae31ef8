//! Which items make the global batch of a step, for the stages that batch their own items (pairs, examples,
//! prompts): grouped by modality and length like the trainer's loader, a pure function of seed and epoch, so a
//! resumed run sees the same batches. Also whether a stage may pack its sequences into shared rows.
use crate::data::loader::Order;
use crate::error::{Error, Result};
use crate::recipe::schema::Mix;
use crate::zoo::mllm::Llava;

/// A stage's `pack = true` as the row length to pack to (`max_len`), or None: packing takes models with a fixed
/// number of tokens per image (LLaVA-1.5 layout); one that tiles images or uses M-RoPE positions is refused.
pub fn pack_cap(pack: bool, max_len: usize, model: &Llava, key: &str) -> Result<Option<usize>> {
    if pack && (model.spec.anyres.is_some() || model.spec.native.is_some()) {
        return Err(Error::input(format!(
            "{key}.pack: sequence packing takes models with a fixed number of tokens per image (LLaVA-1.5 layout); \
             this model tiles images (AnyRes) or uses M-RoPE positions: set pack = false"
        )));
    }
    Ok(pack.then_some(max_len))
}

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
