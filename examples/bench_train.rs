//! Training-step benchmark of the named LLaVA presets (issue 3), f32, one AdamW step per batch:
//!     cargo run --release --example bench_train [-- tiny|small-align|small-instruct|small-lora]
//! Prints one JSON line per preset: median step time over the measured steps (after warm-up), tokens/s
//! (tokens = batch × sequence incl. image tokens) and peak resident memory. `tools/bench_train.py` runs the same
//! presets in PyTorch + transformers for the side-by-side ratio.
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Device;
use mitune::data::loader::MicroBatch;
use mitune::recipe::schema::Adapter;
use mitune::stages::{params, trainer};
use mitune::zoo::connectors::ConnectorSpec;
use mitune::zoo::encoders::{FeatureSelect, VitFamily};
use mitune::zoo::layers::act::Act;
use mitune::zoo::llms::LlmFamily;
use mitune::zoo::lora;
use mitune::zoo::mllm::LlavaSpec;
use mitune::zoo::presets;
use std::time::Instant;

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
    /// LoRA rank on every LLM projection (q, k, v, o, gate, up, down; alpha = 2 × rank), 0 = none
    lora: usize,
}

const PRESETS: [Preset; 4] = [
    Preset {
        name: "tiny",
        enc: "bench-tiny",
        llm: "bench-tiny",
        vocab: 512,
        feature_layer: -1,
        batch: 8,
        text: 64,
        train: &["encoder", "connector", "llm"],
        warmup: 3,
        steps: 20,
        lora: 0,
    },
    Preset {
        name: "small-align",
        enc: "bench-small",
        llm: "bench-small",
        vocab: 32000,
        feature_layer: -2,
        batch: 4,
        text: 128,
        train: &["connector"],
        warmup: 1,
        steps: 3,
        lora: 0,
    },
    Preset {
        name: "small-instruct",
        enc: "bench-small",
        llm: "bench-small",
        vocab: 32000,
        feature_layer: -2,
        batch: 4,
        text: 128,
        train: &["connector", "llm"],
        warmup: 1,
        steps: 3,
        lora: 0,
    },
    // small-instruct with the LLM frozen under LoRA adapters (r = 8) and the connector trained in full.
    Preset {
        name: "small-lora",
        enc: "bench-small",
        llm: "bench-small",
        vocab: 32000,
        feature_layer: -2,
        batch: 4,
        text: 128,
        train: &["connector", r"re:\.lora\.[ab]$"],
        warmup: 1,
        steps: 3,
        lora: 8,
    },
];

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    let only: Option<String> = std::env::args().nth(1);
    let device = Device::flex().autodiff();
    device.seed(0);
    for p in PRESETS
        .iter()
        .filter(|p| only.as_deref().is_none_or(|o| o == p.name))
    {
        let mut llm = presets::llm(p.llm, LlmFamily::Llama, p.vocab).unwrap();
        llm.tie_word_embeddings = p.name == "tiny";
        let spec = LlavaSpec {
            vision: mitune::zoo::encoders::VisionSpec::Vit(
                presets::encoder(p.enc, VitFamily::Clip).unwrap(),
            ),
            select: FeatureSelect {
                layers: vec![p.feature_layer],
                drop_cls: true,
                post_norm: false,
            },
            connector: ConnectorSpec::Mlp {
                depth: 2,
                act: Act::Gelu,
            },
            projector_bias: true,
            llm,
            image_token_id: p.vocab as i64 - 1,
            anyres: None,
            native: None,
        };
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
            let lin = lora::resolve(&model, &f, "lora").unwrap();
            model = lora::attach(model, &f, &lin, &device).unwrap();
        }
        let all = params::list(&model);
        let train: Vec<String> = p.train.iter().map(|s| s.to_string()).collect();
        let trainable = params::select(&all, &train).unwrap();
        let mut model = params::freeze(model, &trainable);
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
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
            tokens: p.batch * seq,
            supervised: p.batch * (p.text - 1),
        };
        let mut times = vec![];
        for i in 0..p.warmup + p.steps {
            let t0 = Instant::now();
            let loss = trainer::micro_loss(&model, &mb, &device)
                .unwrap()
                .div_scalar(mb.supervised as f64);
            let g = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-4, model, g);
            // Sync: read one value back so the step is really done.
            let _ = params::list(&model);
            let _: Vec<f32> = mitune::zoo::layers::to_vec(
                model.multi_modal_projector.as_mlp().unwrap().layers[0]
                    .weight
                    .val()
                    .slice([0..1, 0..1]),
            );
            if i >= p.warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let n_params: usize = all.iter().map(|x| x.numel).sum();
        let n_train: usize = trainable.iter().map(|x| x.numel).sum();
        println!(
            "{}",
            serde_json::json!({
                "framework": "mitune", "preset": p.name, "params": n_params, "trainable": n_train,
                "batch": p.batch, "seq": seq, "image_tokens": n_img, "step_s_median": median,
                "tokens_per_s": (p.batch * seq) as f64 / median, "peak_rss_mb": peak_rss_mb(),
            })
        );
    }
}
