//! LoRA / QLoRA adapters as the step engine applies them to every training stage kind (`adapter = { kind =
//! "lora", rank, alpha, targets, parts }` on align, instruct, pretrain, dpo, reward, grpo, ppo): attached to the
//! LLaVA of the stage's model (`Backbone`: the LLaVA itself, the reward model's, PPO's policy), restored from a
//! checkpoint's `adapter/` on resume, saved in PEFT's layout beside every checkpoint and the final model.
use burn::tensor::Device;
use std::path::Path;

use crate::checkpoint::peft;
use crate::error::Result;
use crate::recipe::schema::{Adapter, Part};
use crate::zoo::lora;
use crate::zoo::mllm::Backbone;

/// `train`'s pattern for every adapter factor (`<weight path>.lora.a` / `.lora.b`).
pub const FACTORS: &str = r"re:\.lora\.[ab]$";

/// A stage's adapters: where they are, and which parts train in full beside them (PEFT's modules_to_save).
pub struct Adapted {
    pub spec: Adapter,
    pub targets: Vec<lora::Linear>,
    pub to_save: Vec<String>,
}

/// The parts that train in full beside adapters when the recipe names none: LLaVA's LoRA recipe (adapters on
/// the LLM, the connector trained in full), and a stage's own head (the reward model's score, PPO's value head).
pub fn default_parts(default: &[Part], spec: &Adapter) -> Vec<Part> {
    default
        .iter()
        .copied()
        .filter(|p| matches!(p, Part::Connector | Part::Head))
        .filter(|p| !spec.parts.iter().any(|a| a == p.name()))
        .collect()
}

impl Adapted {
    /// Attaches `spec`'s adapters to `model`'s LLaVA (`key` names the stage in errors: a target that matches no
    /// Linear of the adapter's parts is one), with the adapter of the checkpoint `resume` loaded into them.
    /// `train` is what trains in full beside them.
    pub fn attach<M: Backbone>(
        model: M,
        spec: &Adapter,
        train: &[String],
        resume: Option<&Path>,
        key: &str,
        device: &Device,
    ) -> Result<(M, Adapted)> {
        let targets = lora::resolve(model.llava(), spec, &format!("{key}.adapter"))?;
        let model = model.map_llava(|l| lora::attach(l, spec, &targets, device))?;
        let model = match resume {
            Some(ck) => {
                model.map_llava(|l| peft::load(l, &ck.join("adapter"), &targets, device))?
            }
            None => model,
        };
        let adapted = Adapted {
            spec: spec.clone(),
            targets,
            to_save: train.to_vec(),
        };
        Ok((model, adapted))
    }

    /// Saves the adapter (PEFT layout) into `out`, naming `base` (where the unmerged model was saved). PEFT's
    /// modules_to_save holds the LLaVA's parts; a stage's own head is in the stage's files beside `base`.
    pub fn save<M: Backbone>(&self, model: &M, base: &Path, out: &Path) -> Result<()> {
        let to_save: Vec<String> = self
            .to_save
            .iter()
            .filter(|p| Part::parse(p) != Some(Part::Head))
            .cloned()
            .collect();
        peft::save(
            model.llava(),
            &self.spec,
            &self.targets,
            &to_save,
            base,
            out,
        )
    }

    /// The model with every adapter merged into its weight (what an HF directory stores).
    pub fn merge<M: Backbone>(model: M) -> Result<M> {
        model.map_llava(|l| Ok(lora::merge(l)))
    }
}
