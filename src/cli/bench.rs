//! `mitune bench train|generate|rollout --preset NAME [--json]`: step time, tokens/s and peak memory of LLaVA presets
//! with random weights, f32. `tools/bench_train.py` / `tools/bench_generate.py` build the same models in
//! PyTorch + transformers (+ PEFT) and print the same JSON fields, so the two are run one after the other on the
//! same machine and compared (README "Performance"). Timing lives here, never in tests.
//!
//! train: one AdamW step per batch (every text token a target), median step time over the measured steps after
//! warm-up; tokens = batch × (image + text tokens). generate: greedy with the KV cache, one image + 32 text tokens
//! per prompt (rows of 32, 30, 28, 26 text tokens, so batch 8 is left-padded), 32 new tokens, median of 3 runs
//! after a warm-up; tokens/s counts generated tokens (prefill included in the time). rollout: RL sampling, 4 of
//! those prompts × 8 completions at temperature 1, 32 new tokens each (`tools/bench_rollout.py`: transformers'
//! `generate(num_return_sequences=8)`).
use crate::stages::adamw::FusedAdamW;
use burn::optim::ModuleOptimizer;
use clap::{Args as ClapArgs, Subcommand};
use std::time::Instant;

use crate::data::loader::MicroBatch;
use crate::error::{Error, Result};
use crate::generate::{GenConfig, Prompt, generate_batch, generate_groups};
use crate::recipe::schema::Adapter;
use crate::recipe::schema::Precision;
use crate::stages::steps::precision_of;
use crate::stages::{params, trainer};
use crate::zoo::connectors::ConnectorSpec;
use crate::zoo::encoders::{FeatureSelect, VisionSpec, VitFamily};
use crate::zoo::layers::act::Act;
use crate::zoo::layers::float_tensor;
use crate::zoo::layers::precision;
use crate::zoo::llms::LlmFamily;
use crate::zoo::lora;
use crate::zoo::mllm::{Llava, LlavaSpec};
use crate::zoo::presets;
use burn::tensor::Device;

#[derive(Subcommand)]
pub enum Args {
    /// Training steps: `tiny`, `small-align`, `small-instruct`, `small-lora`, `1b` (or `all`).
    Train(Opts),
    /// Greedy generation at batch 1 and 8: `tiny`, `small` (or `all`).
    Generate(Opts),
    /// RL rollouts: 4 prompts × 8 sampled completions, each prompt prefilled once for its group (`shared`) and
    /// once per completion (`per_copy`, as `generate(num_return_sequences=8)` expands it): `tiny`, `small`.
    Rollout(Opts),
}

#[derive(ClapArgs)]
pub struct Opts {
    #[arg(long, default_value = "small-align")]
    preset: String,
    /// One JSON line per result on stdout (the fields `tools/bench_*.py` print) instead of a table.
    #[arg(long)]
    json: bool,
    /// Measured steps / runs (default: the preset's).
    #[arg(long)]
    steps: Option<usize>,
    /// train: activation checkpointing per LLM block (a stage's `checkpoint_activations = true`).
    #[arg(long)]
    checkpoint_activations: bool,
    /// train: a stage's `precision`: f32, bf16-mixed (bf16 products, f32 master weights) or bf16 (bf16-mixed with
    /// the frozen weights stored in bf16).
    #[arg(long, default_value = "f32")]
    precision: String,
}

/// A training preset: encoder and LLM presets (`zoo::presets`), batch shape, what trains.
struct Preset {
    name: &'static str,
    enc: &'static str,
    llm: &'static str,
    vocab: usize,
    feature_layer: i64,
    batch: usize,
    text: usize,
    train: &'static [&'static str],
    warmup: usize,
    steps: usize,
    /// LoRA rank on every LLM projection (q, k, v, o, gate, up, down; alpha = 2 × rank), 0 = none.
    lora: usize,
}

const fn preset(
    name: &'static str,
    size: &'static str,
    train: &'static [&'static str],
    lora: usize,
) -> Preset {
    Preset {
        name,
        enc: size,
        llm: size,
        vocab: 32000,
        feature_layer: -2,
        batch: 4,
        text: 128,
        train,
        warmup: 1,
        steps: 3,
        lora,
    }
}

const TRAIN: [Preset; 5] = [
    Preset {
        vocab: 512,
        feature_layer: -1,
        batch: 8,
        text: 64,
        warmup: 3,
        steps: 20,
        ..preset("tiny", "bench-tiny", &["encoder", "connector", "llm"], 0)
    },
    preset("small-align", "bench-small", &["connector"], 0),
    preset("small-instruct", "bench-small", &["connector", "llm"], 0),
    // small-instruct with the LLM frozen under LoRA adapters (r = 8) and the connector trained in full.
    preset(
        "small-lora",
        "bench-small",
        &["connector", r"re:\.lora\.[ab]$"],
        8,
    ),
    // LLaVA-1.5's encoder (CLIP ViT-L/14-336, 576 image tokens) + a TinyLlama-1.1B-shaped LLM under LoRA r = 16,
    // connector in full, batch 1: what a LoRA fine-tune of a 1B-class model costs here.
    Preset {
        enc: "clip-vit-l14-336",
        llm: "tinyllama-1.1b",
        batch: 1,
        steps: 2,
        ..preset("1b", "", &["connector", r"re:\.lora\.[ab]$"], 16)
    },
];

/// (name, preset of encoder and LLM, vocab, feature layer, tied head)
const GENERATE: [(&str, &str, usize, i64, bool); 2] = [
    ("tiny", "bench-tiny", 512, -1, true),
    ("small", "bench-small", 32000, -2, false),
];
const GEN_TEXT: usize = 32;
const GEN_NEW: usize = 32;

pub fn run(args: Args) -> Result<()> {
    match args {
        Args::Train(o) => {
            let picked = pick(&TRAIN.iter().map(|p| p.name).collect::<Vec<_>>(), &o.preset)?;
            for p in TRAIN.iter().filter(|p| picked.contains(&p.name)) {
                let r = train(p, o.steps, o.checkpoint_activations, &o.precision)?;
                emit(&r, o.json);
            }
        }
        Args::Generate(o) => {
            let picked = pick(&GENERATE.iter().map(|p| p.0).collect::<Vec<_>>(), &o.preset)?;
            for p in GENERATE.iter().filter(|p| picked.contains(&p.0)) {
                for r in generate(p, o.steps)? {
                    emit(&r, o.json);
                }
            }
        }
        Args::Rollout(o) => {
            let picked = pick(&GENERATE.iter().map(|p| p.0).collect::<Vec<_>>(), &o.preset)?;
            for p in GENERATE.iter().filter(|p| picked.contains(&p.0)) {
                for r in rollout(p, o.steps)? {
                    emit(&r, o.json);
                }
            }
        }
    }
    Ok(())
}

fn pick<'a>(names: &[&'a str], want: &str) -> Result<Vec<&'a str>> {
    if want == "all" {
        return Ok(names.to_vec());
    }
    names
        .iter()
        .find(|n| **n == want)
        .map(|n| vec![*n])
        .ok_or_else(|| {
            Error::input(format!(
                "--preset {want}: unknown; choose one of {} or all",
                names.join(", ")
            ))
        })
}

fn emit(r: &serde_json::Value, json: bool) {
    if json {
        println!("{r}");
    } else {
        let fields: Vec<String> = r
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| *k != "framework" && *k != "cpu")
            .map(|(k, v)| match v.as_f64() {
                Some(x) if v.is_f64() => format!("{k} {x:.3}"),
                _ => format!("{k} {v}"),
            })
            .collect();
        println!("{}", fields.join("  "));
    }
}

/// The CPU's model name (`/proc/cpuinfo`): figures are only comparable on the same one.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Peak resident memory of this process so far, MB (`VmHWM`).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn spec(enc: &str, llm: &str, vocab: usize, layer: i64, tied: bool) -> Result<LlavaSpec> {
    let unknown = |what: &str, n: &str| Error::input(format!("bench: no {what} preset {n:?}"));
    let mut l = presets::llm(llm, LlmFamily::Llama, vocab).ok_or_else(|| unknown("LLM", llm))?;
    l.tie_word_embeddings = tied;
    Ok(LlavaSpec {
        vision: VisionSpec::Vit(
            presets::encoder(enc, VitFamily::Clip).ok_or_else(|| unknown("encoder", enc))?,
        ),
        select: FeatureSelect {
            layers: vec![layer],
            drop_cls: true,
            post_norm: false,
        },
        connector: ConnectorSpec::Mlp {
            depth: 2,
            act: Act::Gelu,
        },
        projector_bias: true,
        llm: l,
        image_token_id: vocab as i64 - 1,
        anyres: None,
        native: None,
    })
}

fn train(
    p: &Preset,
    steps: Option<usize>,
    checkpoint: bool,
    precision_name: &str,
) -> Result<serde_json::Value> {
    // MITUNE_DEVICE picks the backend (flex when unset), as for every command
    let device = crate::default_device().autodiff();
    device.seed(0);
    let prec: Precision = serde_json::from_value(precision_name.into()).map_err(|_| {
        Error::input(format!(
            "--precision {precision_name:?}: expected f32, bf16-mixed or bf16"
        ))
    })?;
    let (compute, frozen) = precision_of(prec, None, "--precision", &device)?;
    let _autocast = precision::autocast(compute);
    let spec = spec(p.enc, p.llm, p.vocab, p.feature_layer, p.name == "tiny")?;
    let n_img = spec.image_tokens();
    let size = spec.vision.input_size();
    let mut model = spec.init(&device);
    if p.lora > 0 {
        let f = Adapter::lora(
            p.lora,
            2.0 * p.lora as f64,
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            &["llm"],
        );
        let lin = lora::resolve(&model, &f, "lora")?;
        model = lora::attach(model, &f, &lin, &device)?;
    }
    let all = params::list(&model);
    let train: Vec<String> = p.train.iter().map(|s| s.to_string()).collect();
    let trainable = params::select(&all, &train).map_err(Error::input)?;
    let mut model = precision::store(params::freeze(model, &trainable), frozen);
    let param_mb = precision::param_bytes(&model) as f64 / 1e6;
    // the trainer's AdamW (`stages::adamw`), defaults as burn's AdamWConfig
    let mut optim = ModuleOptimizer::from(FusedAdamW::new(0.9, 0.999, 1e-5, 0.0));
    // One image then text per row; every text token is a target.
    let seq = n_img + p.text;
    let row: Vec<i64> = std::iter::repeat_n(p.vocab as i64 - 1, n_img)
        .chain((0..p.text as i64).map(|i| 1 + (i * 7) % (p.vocab as i64 - 2)))
        .collect();
    let labels: Vec<bool> = (0..seq).map(|i| i >= n_img).collect();
    let pixels: Vec<f32> = (0..p.batch * 3 * size * size)
        .map(|i| ((i % 255) as f32 / 127.0) - 1.0)
        .collect();
    let mb = MicroBatch {
        ids: vec![row; p.batch],
        attention: vec![vec![true; seq]; p.batch],
        labels: vec![labels; p.batch],
        pixels: Ok(Some((pixels, [p.batch, 3, size, size]))),
        image_sizes: vec![],
        images_per_row: vec![1; p.batch],
        image_grids: vec![],
        instructions: vec![],
        videos: Ok(None),
        video_grids: vec![],
        video_seconds: vec![],
        dropped: vec![],
        segments: vec![],
        tokens: p.batch * seq,
        real: p.batch * seq,
        supervised: p.batch * (p.text - 1),
    };
    let steps = steps.unwrap_or(p.steps).max(1);
    let mut times = vec![];
    for i in 0..p.warmup + steps {
        let t0 = Instant::now();
        let (_, g) = trainer::micro_grads(&model, &mb, &device, mb.supervised as f64, checkpoint)?;
        model = optim.step(1e-4, model, g);
        sync(&model);
        if i >= p.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let median = median(times);
    let n_params: usize = all.iter().map(|x| x.numel).sum();
    let n_train: usize = trainable.iter().map(|x| x.numel).sum();
    Ok(serde_json::json!({
        "framework": "mitune", "preset": p.name, "params": n_params, "trainable": n_train,
        "batch": p.batch, "seq": seq, "image_tokens": n_img, "step_s_median": median,
        "tokens_per_s": (p.batch * seq) as f64 / median, "peak_rss_mb": peak_rss_mb(),
        "threads": rayon::current_num_threads(), "cpu": cpu_model(),
        "checkpoint_activations": checkpoint, "precision": precision_name, "param_mb": param_mb,
        "device": std::env::var("MITUNE_DEVICE").unwrap_or_else(|_| "flex".into()),
    }))
}

/// Reads one trained value back, so the step's work is really done before the clock stops.
fn sync(model: &Llava) {
    if let Some(m) = model.multi_modal_projector.as_mlp() {
        let _ = crate::zoo::layers::to_vec(m.layers[0].weight.val().slice([0..1, 0..1]));
    }
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Row `r` of the generate and rollout benches: one image + `GEN_TEXT − 2·(r mod 4)` text tokens, its pixels.
fn bench_prompt(r: usize, n_img: usize, vocab: usize, size: usize, device: &Device) -> Prompt {
    let ids: Vec<i64> = std::iter::repeat_n(vocab as i64 - 1, n_img)
        .chain(
            (0..(GEN_TEXT - 2 * (r % 4)) as i64)
                .map(|i| 1 + (i * 7 + r as i64) % (vocab as i64 - 2)),
        )
        .collect();
    let px: Vec<f32> = (0..3 * size * size)
        .map(|i| (((i + r) % 255) as f32 / 127.0) - 1.0)
        .collect();
    Prompt {
        instructions: vec![],
        ids,
        pixels: Some(float_tensor(px, [1, 3, size, size], device)),
        sizes: vec![],
        videos: None,
        index: r as u64,
    }
}

/// A generation preset's model (random weights, seed 0): (model, image tokens, input size, device).
fn gen_model(
    size_preset: &str,
    vocab: usize,
    layer: i64,
    tied: bool,
) -> Result<(Llava, usize, usize, Device)> {
    let device = crate::default_device();
    device.seed(0);
    let spec = spec(size_preset, size_preset, vocab, layer, tied)?;
    let (n_img, size) = (spec.image_tokens(), spec.vision.input_size());
    Ok((spec.init(&device), n_img, size, device))
}

const ROLLOUT_PROMPTS: usize = 4;
const ROLLOUT_GROUP: usize = 8;

/// 4 prompts × 8 completions sampled at temperature 1 (32 new tokens each, no stop): the prompt prefilled once
/// per group against once per completion; median of `runs` (default 3) after a warm-up.
fn rollout(
    &(name, size_preset, vocab, layer, tied): &(&str, &str, usize, i64, bool),
    runs: Option<usize>,
) -> Result<Vec<serde_json::Value>> {
    let (model, n_img, size, device) = gen_model(size_preset, vocab, layer, tied)?;
    let cfg = GenConfig {
        temperature: 1.0,
        seed: 1,
        ..GenConfig::greedy(GEN_NEW, vec![])
    };
    let (np, g) = (ROLLOUT_PROMPTS, ROLLOUT_GROUP);
    let mut out = vec![];
    for shared in [true, false] {
        let mut times = vec![];
        for i in 0..1 + runs.unwrap_or(3).max(1) {
            let t0 = Instant::now();
            let got = if shared {
                let prompts = (0..np)
                    .map(|r| Prompt {
                        index: (r * g) as u64,
                        ..bench_prompt(r, n_img, vocab, size, &device)
                    })
                    .collect();
                generate_groups(&model, prompts, g, &cfg, None, |_, _| {})?
            } else {
                let prompts = (0..np * g)
                    .map(|k| Prompt {
                        index: k as u64,
                        ..bench_prompt(k / g, n_img, vocab, size, &device)
                    })
                    .collect();
                generate_batch(&model, prompts, &cfg, None, |_, _| {})?
            };
            if got.len() != np * g || got.iter().any(|x| x.output_ids.len() != GEN_NEW) {
                return Err(Error::input(
                    "bench rollout: a completion stopped before its 32 tokens",
                ));
            }
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let med = median(times);
        out.push(serde_json::json!({
            "framework": "mitune", "preset": name, "prefill": if shared { "shared" } else { "per_copy" },
            "prompts": np, "group": g, "image_tokens": n_img, "prompt_tokens": n_img + GEN_TEXT,
            "new_tokens": GEN_NEW, "seconds_median": med,
            "rollout_tokens_per_s": (np * g * GEN_NEW) as f64 / med,
            "threads": rayon::current_num_threads(), "cpu": cpu_model(),
        }));
    }
    Ok(out)
}

fn generate(
    &(name, size_preset, vocab, layer, tied): &(&str, &str, usize, i64, bool),
    runs: Option<usize>,
) -> Result<Vec<serde_json::Value>> {
    let (model, n_img, size, device) = gen_model(size_preset, vocab, layer, tied)?;
    let mut out = vec![];
    for batch in [1usize, 8] {
        let prompts = || -> Vec<Prompt> {
            (0..batch)
                .map(|r| bench_prompt(r, n_img, vocab, size, &device))
                .collect()
        };
        let cfg = GenConfig::greedy(GEN_NEW, vec![]);
        let mut times = vec![];
        for i in 0..1 + runs.unwrap_or(3).max(1) {
            let t0 = Instant::now();
            let g = generate_batch(&model, prompts(), &cfg, None, |_, _| {})?;
            if g.iter().any(|g| g.output_ids.len() != GEN_NEW) {
                return Err(Error::input(
                    "bench generate: a row stopped before its 32 tokens",
                ));
            }
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let med = median(times);
        out.push(serde_json::json!({
            "framework": "mitune", "preset": name, "batch": batch, "image_tokens": n_img,
            "prompt_tokens": n_img + GEN_TEXT, "new_tokens": GEN_NEW, "seconds_median": med,
            "generated_tokens_per_s": (batch * GEN_NEW) as f64 / med,
            "threads": rayon::current_num_threads(), "cpu": cpu_model(),
        }));
    }
    Ok(out)
}
