//! Which parameters learn, with which learning rate and weight decay; gradient bookkeeping the optimizer does not
//! do: global-norm clipping (burn's clipping is per tensor) and splitting gradients into groups (per-part
//! learning rates; no weight decay on norms and biases, as LLaVA/HF Trainer do).
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use regex::Regex;
use std::collections::{BTreeMap, HashMap};

use crate::zoo::parts::{Part, part_of};

#[derive(Debug, Clone)]
pub struct ParamInfo {
    pub id: ParamId,
    pub path: String,
    pub numel: usize,
    pub rank: usize,
    pub decay: bool,
}

#[derive(Default)]
struct Lister {
    stack: crate::zoo::path::PathStack,
    out: Vec<ParamInfo>,
}

impl ModuleVisitor for Lister {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.stack.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.stack.path();
        // Norm scales/shifts and biases are 1-D; embeddings and weights decay.
        let decay = D >= 2;
        self.out.push(ParamInfo {
            id: param.id,
            path,
            numel: param.shape().num_elements(),
            rank: D,
            decay,
        });
    }
}

pub fn list<M: Module>(model: &M) -> Vec<ParamInfo> {
    let mut l = Lister::default();
    model.visit(&mut l);
    l.out
}

/// Resolves `train = [...]` (part names or `re:<regex>` over paths) into the trainable set.
pub fn select(
    params: &[ParamInfo],
    train: &[String],
) -> std::result::Result<Vec<ParamInfo>, String> {
    let mut out = vec![];
    for pat in train {
        let hit: Vec<&ParamInfo> = if let Some(re) = pat.strip_prefix("re:") {
            let re =
                Regex::new(re).map_err(|e| format!("train: {pat:?} is not a valid regex: {e}"))?;
            params.iter().filter(|p| re.is_match(&p.path)).collect()
        } else if let Some(part) = Part::parse(pat) {
            params.iter().filter(|p| part_of(&p.path) == part).collect()
        } else {
            return Err(format!(
                "train: {pat:?} is neither a part (encoder, connector, llm, head) nor `re:<regex>`"
            ));
        };
        if hit.is_empty() {
            return Err(format!("train: {pat:?} matches no parameter"));
        }
        for p in hit {
            if !out.iter().any(|q: &ParamInfo| q.id == p.id) {
                out.push(p.clone());
            }
        }
    }
    Ok(out)
}

/// Marks every parameter outside `trainable` as not requiring gradients: frozen parts get no gradients and
/// therefore no optimizer state.
pub fn freeze<M: Module>(model: M, trainable: &[ParamInfo]) -> M {
    struct Freezer<'a>(&'a [ParamInfo]);
    impl ModuleMapper for Freezer<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let keep = self.0.iter().any(|p| p.id == param.id);
            param.set_require_grad(keep)
        }
    }
    model.map(&mut Freezer(trainable))
}

/// Sum of squares of every gradient, as f64 (the global norm is its square root).
pub fn grad_sq_sum<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    struct Norm<'a>(&'a GradientsParams, f64);
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                let s: f32 = g.powf_scalar(2.0).sum().into_scalar::<f32>();
                self.1 += s as f64;
            }
        }
    }
    let mut n = Norm(grads, 0.0);
    model.visit(&mut n);
    n.1
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads<M: Module>(model: &M, grads: &mut GradientsParams, factor: f64) {
    struct Scale<'a>(&'a mut GradientsParams, f64);
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.remove::<D>(param.id) {
                self.0.register(param.id, g.mul_scalar(self.1));
            }
        }
    }
    model.visit(&mut Scale(grads, factor));
}

/// Splits gradients by group key (e.g. (connector, decays)); parameters without a group are dropped.
pub fn split_grads<M: Module, K: Ord + Clone>(
    model: &M,
    mut grads: GradientsParams,
    group_of: &HashMap<ParamId, K>,
) -> BTreeMap<K, GradientsParams> {
    struct Split<'a, K> {
        src: &'a mut GradientsParams,
        group_of: &'a HashMap<ParamId, K>,
        out: BTreeMap<K, GradientsParams>,
    }
    impl<K: Ord + Clone> ModuleVisitor for Split<'_, K> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let (Some(g), Some(k)) =
                (self.src.remove::<D>(param.id), self.group_of.get(&param.id))
            {
                self.out.entry(k.clone()).or_default().register(param.id, g);
            }
        }
    }
    let mut s = Split {
        src: &mut grads,
        group_of,
        out: BTreeMap::new(),
    };
    model.visit(&mut s);
    s.out
}

/// Gives parameters the ids recorded at checkpoint time (by path), so optimizer state saved against those ids
/// applies to the reloaded model.
pub fn restore_ids<M: Module>(model: M, ids: &BTreeMap<String, u64>) -> M {
    struct Ids<'a> {
        stack: crate::zoo::path::PathStack,
        ids: &'a BTreeMap<String, u64>,
    }
    impl ModuleMapper for Ids<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.stack.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            match self.ids.get(&self.stack.path()) {
                Some(&id) => {
                    let (_, value, mapper) = param.consume();
                    Param::from_mapped_value(ParamId::from(id), value, mapper)
                }
                None => param,
            }
        }
    }
    model.map(&mut Ids {
        stack: Default::default(),
        ids,
    })
}

pub fn id_map(params: &[ParamInfo]) -> BTreeMap<String, u64> {
    params
        .iter()
        .map(|p| (p.path.clone(), p.id.val()))
        .collect()
}

/// Sums the gradients of the parameters in `trained` over the ranks of a data-parallel job (`crate::dist`): one
/// flat f32 buffer in the model's parameter order (the same on every rank), one all-reduce (bucketed), then back
/// into tensors. A rank without a gradient for a parameter (none of its samples reached it: no image in its shard)
/// sends zeros, and the parameter gets a gradient when any rank had one, as in one process, where AdamW leaves a
/// parameter without gradient untouched. Returns the summed gradients and the bytes each rank sent.
pub fn all_reduce_grads<M: Module, K>(
    model: &M,
    mut grads: GradientsParams,
    trained: &HashMap<ParamId, K>,
) -> (GradientsParams, usize) {
    // pass 1: [present, values…] per trained parameter
    struct Pack<'a, K> {
        grads: &'a mut GradientsParams,
        trained: &'a HashMap<ParamId, K>,
        buf: Vec<f32>,
    }
    impl<K> ModuleVisitor for Pack<'_, K> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !self.trained.contains_key(&param.id) {
                return;
            }
            let n = param.shape().num_elements();
            match self.grads.remove::<D>(param.id) {
                Some(g) => {
                    self.buf.push(1.0);
                    self.buf.extend_from_slice(&crate::zoo::layers::to_vec(g));
                }
                None => {
                    self.buf.push(0.0);
                    self.buf.resize(self.buf.len() + n, 0.0);
                }
            }
        }
    }
    let mut p = Pack {
        grads: &mut grads,
        trained,
        buf: vec![],
    };
    model.visit(&mut p);
    let mut buf = p.buf;
    crate::dist::sum_f32(&mut buf, "the gradient all-reduce");
    // pass 2: unpack in the same order
    struct Unpack<'a, K> {
        out: GradientsParams,
        trained: &'a HashMap<ParamId, K>,
        buf: &'a [f32],
        at: usize,
    }
    impl<K> ModuleVisitor for Unpack<'_, K> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !self.trained.contains_key(&param.id) {
                return;
            }
            let shape = param.shape();
            let n = shape.num_elements();
            let present = self.buf[self.at] > 0.0;
            let values = &self.buf[self.at + 1..self.at + 1 + n];
            self.at += 1 + n;
            if present {
                let device = param.val().device().inner();
                let data = burn::tensor::TensorData::new(values.to_vec(), shape);
                self.out
                    .register(param.id, Tensor::<D>::from_data(data, &device));
            }
        }
    }
    let mut u = Unpack {
        out: GradientsParams::new(),
        trained,
        buf: &buf,
        at: 0,
    };
    model.visit(&mut u);
    (u.out, buf.len() * 4)
}
