//! Moving parameters between burn modules and HF-named tensors: a [`ModuleMapper`] that fills each parameter from
//! a [`WeightStore`] and a [`ModuleVisitor`] that collects them for writing. Module paths come from burn's
//! `enter_module` names; Linear weights are transposed (burn stores [in, out], PyTorch [out, in]).
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::Dtype;
use std::collections::HashSet;

use super::safetensors_io::{ToWrite, WeightStore};
use crate::error::{Error, Result};
use crate::zoo::path::PathStack;

/// The module path as HF names it: `a.b.gamma` -> `a.b.weight`, `beta` -> `bias`.
fn hf_path(stack: &PathStack) -> (String, bool) {
    let mut names: Vec<&str> = stack.segments().map(|(n, _)| n).collect();
    let (leaf, container) = stack.last().unwrap_or(("", ""));
    let transpose = container == "Struct:Linear" && leaf == "weight";
    if let Some(last) = names.last_mut() {
        *last = match *last {
            "gamma" => "weight",
            "beta" => "bias",
            other => other,
        };
    }
    (names.join("."), transpose)
}

/// Inside a LoRA adapter (burn's reparameterization): its factors are written by `checkpoint::peft`, not here.
fn in_adapter(stack: &PathStack) -> bool {
    stack.inside("Reparameterization")
}

pub(crate) fn transpose2(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

pub struct Loader<'a> {
    store: &'a WeightStore,
    keys: &'a dyn Fn(&str) -> Vec<String>,
    /// Module-path prefixes left as initialized (fresh components of a partial load).
    fresh: &'a [&'a str],
    stack: PathStack,
    device: Device,
    pub used: HashSet<String>,
    pub errors: Vec<Error>,
}

impl<'a> Loader<'a> {
    pub fn new(
        store: &'a WeightStore,
        keys: &'a dyn Fn(&str) -> Vec<String>,
        fresh: &'a [&'a str],
        device: &Device,
    ) -> Self {
        Loader {
            store,
            keys,
            fresh,
            stack: PathStack::default(),
            device: device.clone(),
            used: HashSet::new(),
            errors: vec![],
        }
    }

    /// Fills `module` from the store; errors name the file and tensor. Stored tensors nobody asked for are errors
    /// too (unless known-ignorable), so a checkpoint of another architecture never loads half-way silently.
    /// Fills `module` and ignores the store's other tensors (one part out of a larger file).
    pub fn load_part<M: Module>(mut self, module: M) -> Result<M> {
        let module = module.map(&mut self);
        match self.errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(module),
        }
    }

    pub fn load<M: Module>(mut self, module: M) -> Result<M> {
        let module = module.map(&mut self);
        if let Some(first) = self.errors.first() {
            let more = self.errors.len() - 1;
            let msg = first.to_string();
            return Err(if more == 0 {
                Error::input(msg)
            } else {
                Error::input(format!("{msg} (and {more} more)"))
            });
        }
        let mut unexpected: Vec<&str> = self
            .store
            .keys()
            .filter(|k| !self.used.contains(*k) && !crate::zoo::keys::ignorable(k))
            .collect();
        unexpected.sort();
        if let Some(k) = unexpected.first() {
            let path = self
                .store
                .path_of(k)
                .map(|p| p.to_path_buf())
                .unwrap_or_default();
            return Err(Error::key(
                path,
                *k,
                format!(
                    "unexpected tensor ({} unexpected in all): the checkpoint does not match the model its config describes",
                    unexpected.len()
                ),
            ));
        }
        Ok(module)
    }
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (path, transpose) = hf_path(&self.stack);
        if in_adapter(&self.stack) || self.fresh.iter().any(|f| path.starts_with(f)) {
            return param;
        }
        let candidates = (self.keys)(&path);
        let Some(key) = candidates.iter().find(|k| self.store.contains(k)) else {
            self.errors.push(Error::key(
                self.store.describe(),
                &candidates[0],
                "missing tensor",
            ));
            return param;
        };
        self.used.insert(key.clone());
        let file = self.store.path_of(key).unwrap().to_path_buf();
        let expected: Vec<usize> = param.val().dims().to_vec();
        let want_stored: Vec<usize> = if transpose {
            vec![expected[1], expected[0]]
        } else {
            expected.clone()
        };
        let loaded = match self.store.get(key) {
            Ok(l) => l,
            Err(e) => {
                self.errors.push(e);
                return param;
            }
        };
        if loaded.shape != want_stored {
            self.errors.push(Error::key(
                file,
                key,
                format!(
                    "shape mismatch: the checkpoint has {:?}, the config implies {:?}",
                    loaded.shape, want_stored
                ),
            ));
            return param;
        }
        let values = if transpose {
            transpose2(&loaded.values, want_stored[0], want_stored[1])
        } else {
            loaded.values
        };
        let device = self.device.clone();
        param.map(move |old| {
            let rg = old.is_require_grad();
            let t: Tensor<D> = Tensor::from_data(TensorData::new(values, expected), &device);
            if rg { t.require_grad() } else { t }
        })
    }
}

/// Collects every float parameter under its HF name, ready to write.
pub struct Collector<'a> {
    keys: &'a dyn Fn(&str) -> Vec<String>,
    dtype: Dtype,
    stack: PathStack,
    pub out: Vec<ToWrite>,
}

impl<'a> Collector<'a> {
    pub fn collect<M: Module>(
        module: &M,
        keys: &'a dyn Fn(&str) -> Vec<String>,
        dtype: Dtype,
    ) -> Vec<ToWrite> {
        let mut c = Collector {
            keys,
            dtype,
            stack: PathStack::default(),
            out: vec![],
        };
        module.visit(&mut c);
        c.out
    }
}

impl ModuleVisitor for Collector<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if in_adapter(&self.stack) {
            return;
        }
        let (path, transpose) = hf_path(&self.stack);
        // burn visits an adapted weight as its base (the adapter's factors follow under `lora`): HF layouts hold
        // the base; merge first (`Module::materialize`) to write the adapted weight.
        let t = param.val();
        let dims = t.dims().to_vec();
        let values = crate::zoo::layers::to_vec(t);
        let (shape, values) = if transpose {
            (
                vec![dims[1], dims[0]],
                transpose2(&values, dims[0], dims[1]),
            )
        } else {
            (dims, values)
        };
        self.out.push(ToWrite::f32(
            (self.keys)(&path).remove(0),
            shape,
            &values,
            self.dtype,
        ));
    }
}
