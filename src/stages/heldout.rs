//! Held-out generation metrics run by the pipeline before the first stage and after each training stage: greedy
//! answers to held-out questions (LLaVA layout: the last assistant turn is the reference), scored by exact match
//! after the VQA normalisation `eval` uses (`metrics::vqa_normalize`: case, punctuation, articles, number words,
//! spacing), so "Two." after a stage and "2" in `eval` are the same answer. The full evaluation suite (VQA accuracy
//! over several references, multiple choice, POPE F1, CIDEr) is the eval stage's.
use burn::module::Module;

use crate::data::sources::{self, Role};
use crate::data::templates;
use crate::error::{Error, Result};
use crate::eval::metrics::vqa_normalize;
use crate::generate::{GenConfig, generate, stop_ids};
use crate::model::Built;
use crate::recipe::schema::{Heldout, Source};
use crate::zoo::mllm::MmInput;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Score {
    pub task: String,
    pub n: usize,
    pub correct: usize,
}

impl Score {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.n.max(1) as f64
    }
}

/// Scores every task with the given template; `built.model` may live on an autodiff device.
pub fn evaluate(built: &Built, h: &Heldout, template: &str) -> Result<Vec<Score>> {
    let model = built.model.valid();
    let device = burn::module::Module::devices(&model)[0].clone();
    let cfg = GenConfig::greedy(h.max_new_tokens, stop_ids(&model, &built.text));
    let mut out = vec![];
    for task in &h.tasks {
        let src = Source::LlavaJson {
            path: task.path.clone(),
            images: task.images.clone(),
            weight: 1.0,
            cap: Some(h.limit),
            min_pixels: None,
            max_pixels: None,
            video_min_pixels: None,
            video_max_pixels: None,
            fps: None,
            max_frames: None,
            frame_rate: None,
        };
        let (samples, bad) = sources::load(&src, 0, 0)?;
        if let Some(b) = bad.first() {
            return Err(Error::input(format!(
                "heldout task {}: {}: {}",
                task.name, b.id, b.reason
            )));
        }
        let mut score = Score {
            task: task.name.clone(),
            n: 0,
            correct: 0,
        };
        // data parallel: each rank answers its share; the counts are summed below
        for s in crate::dist::shard(samples.len()).map(|k| &samples[k]) {
            let Some(last) = s.messages.iter().rposition(|(r, _)| *r == Role::Assistant) else {
                return Err(Error::input(format!(
                    "heldout task {}: sample {} has no reference answer",
                    task.name, s.id
                )));
            };
            let prompt = templates::prompt(&built.text, template, &s.messages[..last])
                .map_err(|m| Error::input(format!("heldout task {}: {m}", task.name)))?;
            let (pixels, sizes) = built.images.batch_sized(&s.images, &device)?;
            let ids = built.text.encode_sized(&prompt, false, &sizes)?;
            let ins = built
                .text
                .instructions(s.messages[..last].iter().map(|(_, c)| c.as_str()))?;
            let input = MmInput::single(ids, pixels)
                .with_instructions(ins)
                .with_sizes(sizes);
            let g = generate(&model, input, &cfg, |_| {})?;
            // Answers are one line: a newline ends the answer (the `plain` template trains no EOS, as LLaVA's).
            let text = built.text.decode(&g.output_ids);
            let answer = text.trim_start().lines().next().unwrap_or("");
            score.n += 1;
            score.correct +=
                usize::from(vqa_normalize(answer) == vqa_normalize(&s.messages[last].1));
        }
        out.push(score);
    }
    let mut counts: Vec<f64> = out
        .iter()
        .flat_map(|s| [s.n as f64, s.correct as f64])
        .collect();
    crate::dist::sum_f64(&mut counts, "the held-out scores' all-reduce");
    for (s, c) in out.iter_mut().zip(counts.chunks(2)) {
        (s.n, s.correct) = (c[0] as usize, c[1] as usize);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn held_out_and_eval_normalise_alike() {
        use crate::eval::metrics::vqa_normalize as normalize;
        assert_eq!(normalize("A red Circle."), "red circle");
        assert_eq!(normalize("  the  bottom-right "), "bottom right");
        assert_eq!(normalize("Yes!"), "yes");
        // the disagreement the two normalisers had: number words
        assert_eq!(normalize("Two."), normalize("2"));
    }
}
