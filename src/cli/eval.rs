//! `mitune eval --model DIR --data FILE --task TASK [--shots K] [--cot] [--json]`: one benchmark task on a
//! checkpoint; a table on the terminal, or with --json the report with every prediction.
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::eval::{Options, TaskKind, TaskSpec, run::Split, run_task};
use crate::recipe::schema::{OnBad, Template};

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (LlavaForConditionalGeneration layout, with tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Evaluation file: JSON array, JSON lines, or an object keyed by id (ScienceQA problems.json).
    #[arg(long)]
    pub data: PathBuf,
    /// vqa, mc, pope or caption.
    #[arg(long)]
    pub task: TaskKind,
    /// Folder the image paths are relative to (default: the data file's folder).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Chat template: the checkpoint's own (`tokenizer`) or a built-in one (plain, vicuna_v1, llama_2, chatml).
    #[arg(long, default_value = "tokenizer")]
    pub template: Template,
    /// Answer-format instruction after the question (default per task; "" for none).
    #[arg(long)]
    pub hint: Option<String>,
    /// M-ICL: K demonstrations (image, question, answer) before each query.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// Demonstration pool (default: the evaluated file, never the query's own sample or image).
    #[arg(long)]
    pub demos: Option<PathBuf>,
    /// M-CoT: ask for step-by-step reasoning and score the final "Answer: ...".
    #[arg(long)]
    pub cot: bool,
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Default: 32, or 256 with --cot.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip (and list) bad samples instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Print the report as JSON (metrics and every prediction).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let device = crate::default_device();
    let built = crate::model::load_dir(&a.model, &device)?;
    let template = crate::data::templates::source(a.template, &built.text).map_err(|m| {
        Error::input(format!(
            "{m}: pass --template vicuna_v1 (LLaVA-1.5), llama_2, chatml or plain"
        ))
    })?;
    let spec = TaskSpec {
        name: None,
        task: a.task,
        data: a.data,
        images: a.images,
        split: Split::HeldOut,
        hint: a.hint,
        shots: a.shots,
        demos: a.demos,
        cot: a.cot,
        limit: a.limit,
    };
    let opt = Options {
        template,
        max_new_tokens: a.max_new_tokens.unwrap_or(if a.cot { 256 } else { 32 }),
        batch_size: a.batch_size,
        seed: a.seed,
        on_bad: if a.skip_bad { OnBad::Skip } else { OnBad::Fail },
    };
    let report = run_task(&built.model, &built.text, &built.images, &spec, &opt)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print!("{}", crate::eval::run::table(std::slice::from_ref(&report)));
    }
    Ok(())
}
