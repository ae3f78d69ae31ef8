//! Command line: `mitune train`, `validate`, `data`, `generate`, `chat`, `eval`, `inspect`, `export`, `bench`. Errors print as one line and exit 1.
pub mod bench;
mod chat;
mod eval;
mod generate;
mod inspect;
mod sweep;
mod train;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "mitune",
    version,
    about = "Train and run multimodal LLMs (LLaVA-style) on burn"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a recipe's pipeline of stages (align, instruct, ...) with checkpoints, logs and held-out metrics.
    Train(train::TrainArgs),
    /// Run every point of a sweep file's grid (`--dry-run`: list them); finished points are skipped.
    Sweep(sweep::Args),
    /// Check a recipe (every error with its key and file:line); with --data, dry-run its data.
    Validate(train::ValidateArgs),
    /// Write a built-in dataset: `mitune data shapes --out datasets/shapes`.
    Data {
        /// Which dataset (only `shapes`).
        which: String,
        #[arg(long, default_value = "datasets/shapes")]
        out: PathBuf,
        #[arg(long, default_value_t = 3000)]
        train: usize,
        #[arg(long, default_value_t = 200)]
        heldout: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Generate text from a LLaVA-style HuggingFace checkpoint directory.
    Generate(generate::Args),
    /// Talk to a checkpoint in the terminal (its chat template, streamed answers, /image /reset /quit).
    Chat(chat::Args),
    /// Evaluate a checkpoint on a benchmark file: vqa, mc, pope or caption; M-ICL (--shots) and M-CoT (--cot).
    Eval(eval::Args),
    /// Tables (Markdown, CSV) and SVG plots of runs or sweeps: final/best metrics per run, loss curves overlaid.
    Report {
        /// Run directories (checkpoints/runs/NAME) or sweep directories (their points).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where to write report.md, report.csv and the SVGs (default: DIR/report for the first DIR).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmark a training step or generation on a preset model (random weights): `mitune bench train --preset
    /// small-align`; `tools/bench_*.py` run the same presets in PyTorch for the ratio (README "Performance").
    #[command(subcommand)]
    Bench(bench::Args),
    /// Show a checkpoint's components, parameter counts, dtypes, image tokens and vocabulary.
    Inspect {
        /// Checkpoint directory (LlavaForConditionalGeneration layout).
        dir: PathBuf,
    },
    /// Save a checkpoint (or a run's stage, `RUN/STAGE`) in the LlavaForConditionalGeneration layout; a stage
    /// trained with LoRA gives its base plus the PEFT adapter (`OUT/adapter`), or with --merge-lora one merged model.
    Export {
        /// A run's stage directory (`checkpoints/runs/NAME/STAGE`).
        stage: Option<PathBuf>,
        /// A checkpoint directory (instead of a stage).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Merge the stage's LoRA adapter into the weights.
        #[arg(long)]
        merge_lora: bool,
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Write one component as a standalone transformers directory: `encoder` (CLIPVisionModel /
        /// SiglipVisionModel + preprocessor) or `llm` (LlamaForCausalLM / Qwen2ForCausalLM + tokenizer).
        #[arg(long)]
        part: Option<String>,
    },
}

pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // under `mpirun` (built with `mpi`): joins the job; MPI is finalized when this drops, after the command
    let _mpi = crate::dist::init();
    // a device this build cannot serve stops here, before any work (not later, silently on the CPU)
    let result = match crate::probe_device() {
        Err(msg) => Err(crate::Error::input(msg)),
        Ok(_) => run(cli.command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // the other ranks may be waiting in a collective for this one: end the whole job, naming this rank
        Err(e) if crate::dist::parallel() => crate::dist::fail(&format!("error: {e}")),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> crate::Result<()> {
    match command {
        Command::Train(a) => train::train(a),
        Command::Validate(a) => train::validate(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Data {
            which,
            out,
            train,
            heldout,
            seed,
        } => data(&which, &out, train, heldout, seed),
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Inspect { dir } => inspect::run(&dir),
        Command::Bench(args) => bench::run(args),
        Command::Report { dirs, out } => report(&dirs, out),
        Command::Export {
            stage,
            model,
            merge_lora,
            out,
            dtype,
            part,
        } => match (stage, model) {
            (Some(stage), None) => export_stage(&stage, &out, &dtype, merge_lora),
            (None, Some(model)) if !merge_lora => export(&model, &out, &dtype, part.as_deref()),
            (None, Some(_)) => Err(crate::Error::input(
                "--merge-lora applies to a run's stage: mitune export RUN/STAGE --out DIR --merge-lora",
            )),
            _ => Err(crate::Error::input(
                "give a run's stage (mitune export RUN/STAGE --out DIR) or --model DIR, not both",
            )),
        },
    }
}

fn report(dirs: &[PathBuf], out: Option<PathBuf>) -> crate::Result<()> {
    let runs = crate::report::collect(dirs)?;
    let out = out.unwrap_or_else(|| dirs[0].join("report"));
    let files = crate::report::write(&runs, &out)?;
    print!("{}", crate::report::markdown(&runs));
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}

fn dtype_of(dtype: &str) -> crate::Result<safetensors::Dtype> {
    match dtype {
        "f32" => Ok(safetensors::Dtype::F32),
        "bf16" => Ok(safetensors::Dtype::BF16),
        "f16" => Ok(safetensors::Dtype::F16),
        other => Err(crate::Error::input(format!(
            "--dtype {other}: use f32, bf16 or f16"
        ))),
    }
}

/// `RUN/STAGE`: its model, or for a LoRA stage the base + adapter (merged on request).
fn export_stage(
    stage: &std::path::Path,
    out: &std::path::Path,
    dtype: &str,
    merge: bool,
) -> crate::Result<()> {
    use crate::checkpoint::peft;
    let adapter = stage.join("adapter");
    let base = stage.join("base");
    if !adapter.join(peft::CONFIG).exists() {
        if merge {
            return Err(crate::Error::file(
                stage,
                "this stage trained no LoRA adapter (no adapter/adapter_config.json): drop --merge-lora",
            ));
        }
        if !stage.join("model").join("config.json").exists() {
            return Err(crate::Error::file(
                stage,
                "not a finished stage of a run (no model/config.json): give checkpoints/runs/NAME/STAGE",
            ));
        }
        return export(&stage.join("model"), out, dtype, None);
    }
    let device = crate::default_device();
    if merge {
        let m = peft::load_adapted(&base, &adapter, &device)?;
        let m = crate::zoo::lora::merge(m);
        crate::checkpoint::save_llava(&m, out, dtype_of(dtype)?, Some(&base))?;
        eprintln!(
            "merged {} into {} -> {}",
            adapter.display(),
            base.display(),
            out.display()
        );
        return Ok(());
    }
    export(&base, out, dtype, None)?;
    let dst = out.join("adapter");
    std::fs::create_dir_all(&dst).map_err(|source| crate::Error::Io {
        path: dst.clone(),
        source,
    })?;
    std::fs::copy(adapter.join(peft::WEIGHTS), dst.join(peft::WEIGHTS)).map_err(|source| {
        crate::Error::Io {
            path: adapter.join(peft::WEIGHTS),
            source,
        }
    })?;
    let mut cfg = peft::read_config(&adapter)?;
    cfg.base_model_name_or_path = Some(
        std::path::absolute(out)
            .unwrap_or_else(|_| out.to_path_buf())
            .display()
            .to_string(),
    );
    crate::checkpoint::hf::write_json(
        &dst.join(peft::CONFIG),
        &serde_json::to_value(&cfg).unwrap(),
    )?;
    eprintln!(
        "base -> {}, PEFT adapter -> {} (PeftModel.from_pretrained(model, \"{}\"))",
        out.display(),
        dst.display(),
        dst.display()
    );
    Ok(())
}

fn export(
    model: &std::path::Path,
    out: &std::path::Path,
    dtype: &str,
    part: Option<&str>,
) -> crate::Result<()> {
    let dtype = dtype_of(dtype)?;
    let device = crate::default_device();
    if let Some(part) = part {
        use crate::checkpoint::hf::Part;
        let part = match part {
            "encoder" => Part::Encoder,
            "llm" => Part::Llm,
            other => {
                return Err(crate::Error::input(format!(
                    "--part {other}: use encoder or llm"
                )));
            }
        };
        let b = crate::model::load_dir(model, &device)?;
        let template = b.text.chat_template.clone();
        crate::model::export(
            &b.model,
            &b.text,
            &b.processor,
            template.as_deref(),
            Some((part, dtype)),
            out,
        )?;
        eprintln!(
            "saved the {part:?} of {} -> {}",
            model.display(),
            out.display()
        );
        return Ok(());
    }
    let m = crate::checkpoint::load_llava(model, &device)?;
    crate::checkpoint::save_llava(&m, out, dtype, Some(model))?;
    eprintln!("saved {} -> {}", model.display(), out.display());
    Ok(())
}

fn data(
    which: &str,
    out: &std::path::Path,
    train: usize,
    heldout: usize,
    seed: u64,
) -> crate::Result<()> {
    if which != "shapes" {
        return Err(crate::Error::input(format!(
            "mitune data {which}: the built-in datasets are: shapes"
        )));
    }
    let cfg = crate::data::shapes::ShapesConfig {
        seed,
        train,
        heldout,
        ..Default::default()
    };
    let wrote = crate::data::shapes::ensure(out, &cfg)?;
    eprintln!(
        "{} {}",
        if wrote { "wrote" } else { "up to date:" },
        out.display()
    );
    Ok(())
}
