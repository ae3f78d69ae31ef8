//! LoRA / QLoRA adapters on a LLaVA's Linear weights, through burn's built-in reparameterization: an adapted
//! weight reads `base + alpha/rank · A·B` (burn layout: base [in, out], A [in, r], B [r, out]; B starts at zero,
//! so the adapted model starts equal to its base). The base weights freeze, the factors train. Targets are named
//! the way PEFT's `target_modules` names them, against the module's transformers name, so the adapter saved by
//! `checkpoint::peft` applies to the same modules in Python.
use burn::module::{Lora, Module, ModuleVisitor, Param, ParamGroup, ParamId, QLora, Quantizer};
use burn::tensor::quantization::{Calibration, QuantValue};
use burn::tensor::{Device, Tensor};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::zoo::keys;
use crate::zoo::mllm::Llava;
use crate::zoo::parts::{Part, part_of};

/// Low-rank adapters on Linear weights (burn's built-in LoRA/QLoRA), saved in PEFT's layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adapter {
    pub kind: AdapterKind,
    pub rank: usize,
    pub alpha: f64,
    /// PEFT's `lora_dropout`; only 0 is implemented so far.
    #[serde(default)]
    pub dropout: f64,
    /// Module names (`q_proj`: every Linear so named) or `re:<regex>` matched in full against the module's
    /// transformers name (`model.language_model.layers.0.self_attn.q_proj`), as PEFT's `target_modules`.
    pub targets: Vec<String>,
    /// Which parts the targets apply to: `llm` (default), `encoder`, `connector`.
    #[serde(default = "llm_part")]
    pub parts: Vec<String>,
    /// QLoRA only: the base's width, 8 (default) or 4 (symmetric, per tensor).
    pub bits: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    Lora,
    /// LoRA over a quantized base, as QLoRA.
    Qlora,
}

impl Adapter {
    /// A plain LoRA adapter (tests, benchmarks).
    pub fn lora(rank: usize, alpha: f64, targets: &[&str], parts: &[&str]) -> Self {
        Adapter {
            kind: AdapterKind::Lora,
            rank,
            alpha,
            dropout: 0.0,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            parts: parts.iter().map(|t| t.to_string()).collect(),
            bits: None,
        }
    }
    /// The quantization width of the base (None: LoRA over the float base).
    pub fn quant_bits(&self) -> Option<u8> {
        match self.kind {
            AdapterKind::Lora => None,
            AdapterKind::Qlora => Some(self.bits.unwrap_or(8)),
        }
    }
}

fn llm_part() -> Vec<String> {
    vec!["llm".into()]
}

/// One Linear weight an adapter may target.
#[derive(Debug, Clone)]
pub struct Linear {
    pub id: ParamId,
    /// burn parameter path (`language_model.layers.0.self_attn.q_proj.weight`)
    pub param: String,
    /// the module's transformers 5 name (`model.language_model.layers.0.self_attn.q_proj`)
    pub module: String,
    /// encoder, connector or llm
    pub part: Part,
}

/// The transformers 5 name of a burn parameter path (`LlavaForConditionalGeneration`'s native layout; the
/// 4.x names that mitune writes in full checkpoints are first in `keys::llava`, these are the `model.` ones).
pub fn hf5_key(path: &str) -> String {
    let cands = keys::llava(path);
    cands
        .iter()
        .find(|k| k.starts_with("model.") || k.starts_with("lm_head."))
        .cloned()
        .unwrap_or_else(|| cands[0].clone())
}

/// Every Linear weight of the model, in visiting order.
pub fn linears<M: Module>(model: &M) -> Vec<Linear> {
    #[derive(Default)]
    struct V {
        stack: crate::zoo::path::PathStack,
        out: Vec<Linear>,
    }
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.stack.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some((leaf, container)) = self.stack.last() else {
                return;
            };
            if D != 2 || leaf != "weight" || container != "Struct:Linear" {
                return;
            }
            let param_path = self.stack.path();
            let key = hf5_key(&param_path);
            self.out.push(Linear {
                id: param.id,
                module: key.strip_suffix(".weight").unwrap_or(&key).to_string(),
                part: part_of(&param_path),
                param: param_path,
            });
        }
    }
    let mut v = V::default();
    model.visit(&mut v);
    v.out
}

/// The Linear modules `targets` select within `parts` (PEFT's rules: a plain name matches a module whose name
/// ends with `.name`; `re:` must match the whole name). Every target must match something.
pub fn resolve(model: &Llava, f: &Adapter, key: &str) -> Result<Vec<Linear>> {
    let all: Vec<Linear> = linears(model)
        .into_iter()
        .filter(|l| f.parts.iter().any(|p| p == l.part.name()))
        .collect();
    let mut out: Vec<Linear> = vec![];
    for t in &f.targets {
        let hit: Vec<&Linear> = if let Some(re) = t.strip_prefix("re:") {
            let re = Regex::new(&format!("^(?:{re})$"))
                .map_err(|e| Error::input(format!("{key}.targets: {t:?}: {e}")))?;
            all.iter().filter(|l| re.is_match(&l.module)).collect()
        } else {
            all.iter()
                .filter(|l| l.module == *t || l.module.ends_with(&format!(".{t}")))
                .collect()
        };
        if hit.is_empty() {
            let mut names: Vec<&str> = all
                .iter()
                .map(|l| l.module.rsplit('.').next().unwrap_or(""))
                .collect();
            names.sort();
            names.dedup();
            return Err(Error::input(format!(
                "{key}.targets: {t:?} matches no Linear module in parts {:?} (their names: {}; e.g. {})",
                f.parts,
                names.join(", "),
                all.first().map(|l| l.module.as_str()).unwrap_or("none")
            )));
        }
        for l in hit {
            if !out.iter().any(|o| o.id == l.id) {
                out.push(l.clone());
            }
        }
    }
    Ok(out)
}

/// Attaches adapters to `targets` (their bases quantized to `f.bits` for QLoRA). Every base parameter of the
/// model is left frozen; the caller unfreezes what else trains.
pub fn attach(model: Llava, f: &Adapter, targets: &[Linear], device: &Device) -> Result<Llava> {
    let group = ParamGroup::from_ids(targets.iter().map(|t| t.id).collect());
    let lora = Lora::new(f.rank, f.alpha).set_param_group(group.clone());
    Ok(match f.quant_bits() {
        None => model.apply_lora(lora),
        Some(bits) => {
            let value = match bits {
                8 => QuantValue::Q8S,
                4 => QuantValue::Q4S,
                b => return Err(Error::input(format!("qlora bits = {b}: use 8 or 4"))),
            };
            let scheme = device.settings().quantization.scheme.with_value(value);
            let mut q = Quantizer::new(Calibration::MinMax, scheme);
            q.set_param_group(group);
            model.apply_qlora(QLora::new(lora, q))
        }
    })
}

/// The adapted model with every adapter merged into its weight (what an HF directory stores).
pub fn merge(model: Llava) -> Llava {
    // a base stored in bf16 (`frozen_dtype`) merges in f32, as the adapters are
    crate::zoo::layers::precision::store(model, burn::tensor::DType::F32).materialize()
}

/// Every adapter factor's values by burn path (`<weight path>.lora.a` [in, r], `.lora.b` [r, out]).
pub fn factors<M: Module>(model: &M) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    #[derive(Default)]
    struct V {
        stack: crate::zoo::path::PathStack,
        out: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    }
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.stack.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.stack.has("lora") {
                let t = param.val();
                let dims = t.dims().to_vec();
                self.out
                    .insert(self.stack.path(), (dims, crate::zoo::layers::to_vec(t)));
            }
        }
    }
    let mut v = V::default();
    model.visit(&mut v);
    v.out
}
