//! `mitune generate`: prompt (+ images) -> text, streamed, or one JSON object with ids and log-probs.
use std::io::Write;
use std::path::PathBuf;

use crate::checkpoint::hf::llava_spec;
use crate::checkpoint::load_llava;
use crate::data::images::ImageProcessor;
use crate::data::tokenizer::TextProcessor;
use crate::error::{Error, Result};
use crate::generate::{GenConfig, generate};
use crate::zoo::mllm::MmInput;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (LlavaForConditionalGeneration layout, with tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt; each `<image>` marker takes one --image, in order.
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// Use the prompt as written (no chat template); BOS is added as the tokenizer does.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object: input_ids, output_ids, text, logprobs.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec = llava_spec(&a.model)?;
    let text = TextProcessor::load(&a.model, spec.image_token_id, spec.image_tokens())?;
    // Markers vs images first: nothing is computed for a prompt that cannot run.
    let markers = text.markers(&a.prompt);
    if markers != a.image.len() {
        return Err(Error::input(format!(
            "the prompt has {markers} `{}` marker(s) but {} --image file(s) were given: give one image per marker",
            text.image_token,
            a.image.len()
        )));
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) || a.temperature < 0.0 {
        return Err(Error::input(
            "--top-p must be in (0, 1] and --temperature >= 0",
        ));
    }
    let device = crate::default_device();
    let pixels = if a.image.is_empty() {
        None
    } else {
        ImageProcessor::load(&a.model)?.batch(&a.image, &device)?
    };
    let ids = if a.raw {
        text.encode(&a.prompt, true)?
    } else {
        text.encode_chat(&a.prompt)?
    };
    let model = load_llava(&a.model, &device)?;
    let mut eos = spec.llm.eos_token_ids.clone();
    eos.extend(text.eos_token_id);
    let cfg = GenConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        eos,
    };
    let input = MmInput::single(ids.clone(), pixels);
    let mut shown = String::new();
    let mut so_far = vec![];
    let stdout = std::io::stdout();
    let out = generate(&model, input, &cfg, |id| {
        if a.json {
            return;
        }
        so_far.push(id);
        let now = text.decode(&so_far);
        if let Some(delta) = now.strip_prefix(shown.as_str()) {
            let mut lock = stdout.lock();
            let _ = write!(lock, "{delta}");
            let _ = lock.flush();
        }
        shown = now;
    })?;
    let decoded = text.decode(&out.output_ids);
    if a.json {
        let v = serde_json::json!({
            "input_ids": ids,
            "output_ids": out.output_ids,
            "text": decoded,
            "logprobs": out.logprobs,
        });
        println!("{v}");
    } else {
        println!();
    }
    Ok(())
}
