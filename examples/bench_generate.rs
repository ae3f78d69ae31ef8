//! Generation throughput of LLaVA presets, f32, greedy, KV cache: each prompt = one image + 32 text tokens, 32
//! new tokens (no EOS), at batch 1 and batch 8 (one left-padded batch):
//!     cargo run --release --example bench_generate [-- tiny|small]
//! Prints one JSON line per (preset, batch): generated tokens/s (prefill included), the median of 3 runs after a
//! warm-up. `tools/bench_generate.py` runs the same presets through transformers' `generate` for the ratio.
use burn::tensor::Device;
use mitune::generate::{GenConfig, Prompt, generate_batch};
use mitune::zoo::connectors::ConnectorSpec;
use mitune::zoo::encoders::{FeatureSelect, VitFamily};
use mitune::zoo::layers::act::Act;
use mitune::zoo::layers::float_tensor;
use mitune::zoo::llms::LlmFamily;
use mitune::zoo::mllm::LlavaSpec;
use mitune::zoo::presets;
use std::time::Instant;

/// (name, encoder preset, llm preset, vocab, feature layer, tied head)
const PRESETS: [(&str, &str, &str, usize, i64, bool); 2] = [
    ("tiny", "bench-tiny", "bench-tiny", 512, -1, true),
    ("small", "bench-small", "bench-small", 32000, -2, false),
];
const TEXT: usize = 32;
const NEW: usize = 32;

fn main() {
    let only: Option<String> = std::env::args().nth(1);
    let device = Device::flex();
    device.seed(0);
    for (name, enc, llm, vocab, layer, tied) in PRESETS
        .into_iter()
        .filter(|p| only.as_deref().is_none_or(|o| o == p.0))
    {
        let mut l = presets::llm(llm, LlmFamily::Llama, vocab).unwrap();
        l.tie_word_embeddings = tied;
        let spec = LlavaSpec {
            vision: mitune::zoo::encoders::VisionSpec::Vit(
                presets::encoder(enc, VitFamily::Clip).unwrap(),
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
        };
        let n_img = spec.image_tokens();
        let size = spec.vision.input_size();
        let model = spec.init(&device);
        for batch in [1usize, 8] {
            // rows of different text lengths (32, 30, 28, ...) so the batch really is left-padded
            let prompts = || -> Vec<Prompt> {
                (0..batch)
                    .map(|r| {
                        let ids: Vec<i64> = std::iter::repeat_n(vocab as i64 - 1, n_img)
                            .chain(
                                (0..(TEXT - 2 * (r % 4)) as i64)
                                    .map(|i| 1 + (i * 7 + r as i64) % (vocab as i64 - 2)),
                            )
                            .collect();
                        let px: Vec<f32> = (0..3 * size * size)
                            .map(|i| (((i + r) % 255) as f32 / 127.0) - 1.0)
                            .collect();
                        Prompt {
                            instructions: vec![],
                            ids,
                            pixels: Some(float_tensor(px, [1, 3, size, size], &device)),
                            sizes: vec![],
                            videos: None,
                            index: r as u64,
                        }
                    })
                    .collect()
            };
            let cfg = GenConfig::greedy(NEW, vec![]);
            let mut times = vec![];
            for i in 0..4 {
                let t0 = Instant::now();
                let out = generate_batch(&model, prompts(), &cfg, None, |_, _| {}).unwrap();
                assert!(out.iter().all(|g| g.output_ids.len() == NEW));
                if i > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let med = times[times.len() / 2];
            println!(
                "{}",
                serde_json::json!({
                    "framework": "mitune", "preset": name, "batch": batch, "image_tokens": n_img,
                    "prompt_tokens": n_img + TEXT, "new_tokens": NEW, "seconds_median": med,
                    "generated_tokens_per_s": (batch * NEW) as f64 / med,
                })
            );
        }
    }
}
