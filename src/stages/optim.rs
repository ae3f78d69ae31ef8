//! The optimizer side every training stage shares: which parameters learn (the rest frozen, with no optimizer
//! state), AdamW per (part, decay) group with per-part learning rates, global-norm clipping, and saving/loading
//! the moments for exact resume. Stages own their loops; this is the helper they call, not a base class.
use burn::module::{Module, ParamId};
use burn::optim::{GradientsParams, ModuleOptimizer};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::adamw::FusedAdamW;
use super::checkpoints;
use super::params::{self, ParamInfo};
use crate::error::{Error, Result};
use crate::recipe::schema::{Optim, Part};

pub struct Groups {
    /// keyed by "decays?" (weight decay only on ≥2-D parameters)
    optims: BTreeMap<bool, ModuleOptimizer>,
    /// (part, decays?) of every trained parameter
    group_of: HashMap<ParamId, (Part, bool)>,
    lr: f64,
    part_lr: BTreeMap<Part, f64>,
    pub n_train: usize,
    pub n_all: usize,
}

impl Groups {
    /// Optimizers for `optim`; `stage` names the recipe table in errors.
    pub fn new(optim: &Optim, stage: &str) -> Result<Self> {
        let Optim::Adamw {
            lr,
            betas,
            eps,
            weight_decay,
            part_lr,
        } = optim;
        // the recipe's checks named a bad key already; this only converts
        let part_lr = part_lr
            .iter()
            .map(|(k, v)| match Part::parse(k) {
                Some(p) => Ok((p, *v)),
                None => Err(Error::input(format!(
                    "stages.{stage}.optim.part_lr.{k}: not a part (encoder, connector, llm, head)"
                ))),
            })
            .collect::<Result<_>>()?;
        // burn's AdamW, fused into one pass per parameter on the CPU (`adamw.rs`; same bits)
        let adamw = |wd: f64| {
            ModuleOptimizer::from(FusedAdamW::new(
                betas[0] as f32,
                betas[1] as f32,
                *eps as f32,
                wd as f32,
            ))
        };
        Ok(Groups {
            optims: BTreeMap::from([(true, adamw(*weight_decay)), (false, adamw(0.0))]),
            group_of: HashMap::new(),
            lr: *lr,
            part_lr,
            n_train: 0,
            n_all: 0,
        })
    }

    /// Restores parameter ids and optimizer moments from a checkpoint directory.
    pub fn resume<M: Module>(&mut self, model: M, ck: &Path) -> Result<(M, usize)> {
        let st = checkpoints::read_state(ck)?;
        let model = params::restore_ids(model, &st.param_ids);
        for (decay, o) in self.optims.iter_mut() {
            let p = ck.join(checkpoints::optim_file(*decay));
            if p.exists() {
                *o = o
                    .clone()
                    .load(&p)
                    .map_err(|e| Error::file(&p, format!("cannot read optimizer state: {e:?}")))?;
            }
        }
        Ok((model, st.step))
    }

    /// Freezes everything but `train` (parts or `re:` patterns) and keys the groups by parameter id; call after
    /// `resume`, whose restored ids the optimizer state refers to.
    pub fn select<M: Module>(&mut self, model: M, train: &[String], stage: &str) -> Result<M> {
        let all = params::list(&model);
        let trainable: Vec<ParamInfo> =
            params::select(&all, train).map_err(|m| Error::input(format!("stages.{stage}.{m}")))?;
        self.group_of = trainable
            .iter()
            .map(|p| (p.id, (crate::zoo::parts::part_of(&p.path), p.decay)))
            .collect();
        self.n_train = trainable.iter().map(|p| p.numel).sum();
        self.n_all = all.iter().map(|p| p.numel).sum();
        Ok(params::freeze(model, &trainable))
    }

    /// Clips by global norm (0 = off), steps every group at its lr × `factor`; returns the model and the norm
    /// before clipping.
    pub fn step<M: Module>(
        &mut self,
        mut model: M,
        mut grads: GradientsParams,
        clip: f64,
        factor: f64,
    ) -> (M, f64) {
        let norm = params::grad_sq_sum(&model, &grads).sqrt();
        if clip > 0.0 && norm > clip {
            params::scale_grads(&model, &mut grads, clip / (norm + 1e-6));
        }
        for ((part, decay), g) in params::split_grads(&model, grads, &self.group_of) {
            let lr = self.part_lr.get(&part).copied().unwrap_or(self.lr) * factor;
            if let Some(o) = self.optims.get_mut(&decay) {
                model = o.step(lr, model, g);
            }
        }
        (model, norm)
    }

    /// Data parallel: the trained parameters' gradients summed over the ranks (`params::all_reduce_grads`), and
    /// the bytes sent.
    pub fn all_reduce<M: Module>(
        &self,
        model: &M,
        grads: GradientsParams,
    ) -> (GradientsParams, usize) {
        params::all_reduce_grads(model, grads, &self.group_of)
    }

    /// Writes the moments into a checkpoint folder.
    pub fn save(&self, dir: &Path) -> Result<()> {
        for (decay, o) in &self.optims {
            let p = dir.join(checkpoints::optim_file(*decay));
            o.save(&p)
                .map_err(|e| Error::file(&p, format!("cannot write optimizer state: {e:?}")))?;
        }
        Ok(())
    }

    pub fn lr(&self) -> f64 {
        self.lr
    }
}

/// The parameter ids of the model as saved in checkpoints (so moments reload onto the right tensors).
pub fn state<M: Module>(model: &M, step: usize, total: usize) -> checkpoints::TrainState {
    checkpoints::TrainState {
        step,
        total,
        param_ids: params::id_map(&params::list(model)),
    }
}
