//! A reward model for RLHF: the MLLM backbone with a scalar head on the last response token (transformers'
//! `*ForSequenceClassification` with one label). The reward stage trains it; GRPO and PPO score rollouts with it.
//! Saved as a LLaVA directory plus `score.safetensors` (`score.weight`, [1, hidden], as HF's `score` layer).
use crate::zoo::layers::linear::{Linear, LinearConfig};
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use std::path::Path;

use super::backward::to_input;
use crate::checkpoint::safetensors_io::{ToWrite, WeightStore, write_file};
use crate::data::loader::micro_batch;
use crate::data::templates::Encoded;
use crate::error::{Error, Result};
use crate::model::{self, Built, export};
use crate::zoo::layers::{float_tensor, int_tensor, to_vec};
use crate::zoo::mllm::{Backbone, Llava, MmInput};

pub const SCORE_FILE: &str = "score.safetensors";

#[derive(Module, Debug)]
pub struct RewardModel {
    pub llava: Llava,
    /// hidden -> 1, no bias (HF's `score`)
    pub score: Linear,
}

impl RewardModel {
    /// A fresh head (zero-initialised, so every reward starts at 0) on a backbone.
    pub fn new(llava: Llava, device: &Device) -> Self {
        let d = llava.spec.llm.hidden_size;
        let mut score = LinearConfig::new(d, 1).with_bias(false).init(device);
        score.weight = Param::from_tensor(Tensor::zeros([d, 1], device));
        RewardModel { llava, score }
    }

    /// Rewards [n]: the head on the final hidden state at each (row, position) of `last` (each sequence's last
    /// response token).
    pub fn rewards(&self, input: &MmInput, last: &[(usize, usize)]) -> Result<Tensor<1>> {
        Ok(self.score_at(self.llava.hidden(input)?, last))
    }

    /// The head on final hidden states h [b, t, d] at the (row, position) pairs `last`: [n].
    pub fn score_at(&self, h: Tensor<3>, last: &[(usize, usize)]) -> Tensor<1> {
        let [b, t, d] = h.dims();
        let n = last.len();
        let idx: Vec<i64> = last.iter().map(|&(r, k)| (r * t + k) as i64).collect();
        let picked = h
            .reshape([b * t, d])
            .select(0, int_tensor(idx, [n], &self.score.weight.device()));
        self.score.forward(picked).reshape([n])
    }

    pub fn save(
        &self,
        text: &crate::data::tokenizer::TextProcessor,
        processor: &serde_json::Value,
        template: &str,
        out: &Path,
    ) -> Result<()> {
        export(&self.llava, text, processor, Some(template), None, out)?;
        // data parallel: rank 0 alone writes (every rank holds the same head)
        if !crate::dist::writer() {
            return Ok(());
        }
        let w = to_vec(self.score.weight.val()); // [d, 1] = HF's [1, d] transposed: same values
        write_file(
            &out.join(SCORE_FILE),
            &[ToWrite::f32(
                "score.weight".into(),
                vec![1, w.len()],
                &w,
                safetensors::Dtype::F32,
            )],
        )
    }
}

impl Backbone for RewardModel {
    fn llava(&self) -> &Llava {
        &self.llava
    }
    fn map_llava(self, f: impl FnOnce(Llava) -> Result<Llava>) -> Result<Self> {
        Ok(RewardModel {
            llava: f(self.llava)?,
            score: self.score,
        })
    }
}

/// Loads a reward model saved by the reward stage.
pub fn load(dir: &Path, device: &Device) -> Result<(RewardModel, Built)> {
    let built = model::load_dir(dir, device)?;
    let p = dir.join(SCORE_FILE);
    if !p.exists() {
        return Err(Error::file(
            &p,
            "missing: not a reward model (train one with a `kind = \"reward\"` stage)",
        ));
    }
    let store = WeightStore::open_files(&[p.clone()])?;
    let w = store.get("score.weight")?;
    let d = built.model.spec.llm.hidden_size;
    if w.shape != [1, d] {
        return Err(Error::key(
            &p,
            "score.weight",
            format!("shape {:?}, expected [1, {d}]", w.shape),
        ));
    }
    let mut rm = RewardModel::new(built.model.clone(), device);
    rm.score.weight = Param::from_tensor(float_tensor(w.values, [d, 1], device));
    Ok((rm, built))
}

/// Index of each row's last supervised token (the end of the response).
pub fn last_targets(labels: &[Vec<bool>]) -> Vec<(usize, usize)> {
    labels
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.iter().rposition(|&l| l).unwrap_or(r.len() - 1)))
        .collect()
}

/// Scores responses with a reward model: `rows` already encoded (response supervised), rewards [n].
pub fn score(rm: &RewardModel, rows: &[&Encoded], b: &Built, device: &Device) -> Result<Vec<f32>> {
    let mb = micro_batch(rows, b.text.pad_id(), &b.images);
    Ok(to_vec(rm.rewards(
        &to_input(&mb, device)?,
        &last_targets(&mb.labels),
    )?))
}
