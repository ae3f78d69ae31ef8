//! On-policy pieces shared by the RL stages (GRPO, PPO): prompts encoded through the chat template, completions
//! sampled with the KV cache (each prompt prefilled once for its group; each completion its own seeded RNG, so a
//! step's rollouts are a pure function of the weights and the step), rows re-encoded as prompt + completion with
//! only the completion supervised.
use burn::tensor::Device;

use crate::data::images::ImageProcessor;
use crate::data::preference::PromptItem;
use crate::data::templates::{self, Encoded};
use crate::error::Result;
use crate::generate::{GenConfig, Prompt, generate_groups};
use crate::model::Built;
use crate::zoo::mllm::Llava;

pub use crate::recipe::schema::Sampling;

/// One sampled completion, ready for the loss.
pub struct Rollout {
    /// Index of its prompt in the stage's prompt list.
    pub prompt: usize,
    /// Prompt + completion ids; only the completion (EOS included when produced) supervised.
    pub row: Encoded,
    /// The completion as text (EOS and turn-end tokens dropped).
    pub text: String,
    pub tokens: usize,
}

/// Prompt ids through the chat template (generation prompt appended).
pub fn encode_prompt(
    b: &Built,
    template: &str,
    p: &PromptItem,
) -> std::result::Result<Vec<i64>, String> {
    let text = templates::prompt(&b.text, template, &p.history)?;
    let sizes = ImageProcessor::sizes(&p.images).map_err(|e| e.to_string())?;
    b.text
        .encode_sized(&text, false, &sizes)
        .map_err(|e| e.to_string())
}

/// Samples `group` completions of every prompt in `which` with `model` (inner device); prompt-major order.
/// Completion k of the prompt at position i of the step is seeded with `seed + (first + i·group + k)`.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &Llava,
    b: &Built,
    prompts: &[PromptItem],
    prompt_ids: &[Vec<i64>],
    which: &[usize],
    group: usize,
    cfg: &GenConfig,
    first: u64,
    device: &Device,
) -> Result<Vec<Rollout>> {
    let mut batch = vec![];
    let mut owner = vec![];
    for (i, &p) in which.iter().enumerate() {
        let (pixels, sizes) = b.images.batch_sized(&prompts[p].images, device)?;
        let ins = b
            .text
            .instructions(prompts[p].history.iter().map(|(_, c)| c.as_str()))?;
        batch.push(Prompt {
            instructions: ins,
            ids: prompt_ids[p].clone(),
            pixels,
            sizes,
            videos: None,
            index: first + (i * group) as u64,
        });
        owner.extend(std::iter::repeat_n(p, group));
    }
    // each prompt encoded and prefilled once, its cache shared by its group's completions
    let out = generate_groups(model, batch, group, cfg, None, |_, _| {})?;
    let mut rollouts = vec![];
    for (g, p) in out.into_iter().zip(owner) {
        let mut ids = prompt_ids[p].clone();
        let n_prompt = ids.len();
        ids.extend(&g.output_ids);
        let mut labels = vec![false; n_prompt];
        labels.extend(std::iter::repeat_n(true, g.output_ids.len()));
        let mut shown = g.output_ids.clone();
        shown.retain(|i| !cfg.eos.contains(i));
        rollouts.push(Rollout {
            prompt: p,
            row: Encoded {
                index: p,
                ids,
                labels,
                images: prompts[p].images.clone(),
                image_grids: vec![],
                videos: vec![],
                instructions: b
                    .text
                    .instructions(prompts[p].history.iter().map(|(_, c)| c.as_str()))?,
            },
            text: b.text.decode(&shown),
            tokens: g.output_ids.len(),
        });
    }
    Ok(rollouts)
}
