//! Generation throughput: the two LLaVA fixtures, and a ~100M-parameter LLaMA built from random weights.
//!     cargo run --release --example bench_generate
use burn::tensor::Device;
use mitune::generate::{GenConfig, generate};
use mitune::zoo::layers::act::Act;
use mitune::zoo::layers::rope::{Rope, RopeScaling};
use mitune::zoo::layers::{int_tensor, to_vec};
use mitune::zoo::llms::{KvCache, LlmFamily, LlmSpec};
use mitune::zoo::mllm::MmInput;
use std::time::Instant;

fn main() {
    let device = Device::flex();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["llava_clip_llama", "llava_siglip_qwen2"] {
        let model = mitune::checkpoint::load_llava(&root.join(name), &device).unwrap();
        let ids: Vec<i64> = (0..48).map(|i| 10 + i).collect();
        let cfg = GenConfig::greedy(64, vec![]);
        let t0 = Instant::now();
        let out = generate(&model, MmInput::single(ids, None), &cfg, |_| {}).unwrap();
        let s = t0.elapsed().as_secs_f64();
        println!(
            "{name}: {} tokens in {s:.3} s = {:.1} tokens/s (48-token prompt, prefill included)",
            out.output_ids.len(),
            out.output_ids.len() as f64 / s
        );
    }
    let spec = LlmSpec {
        family: LlmFamily::Llama,
        vocab_size: 32000,
        hidden_size: 640,
        intermediate_size: 1728,
        num_layers: 12,
        num_heads: 10,
        num_kv_heads: 5,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        act: Act::Silu,
        rope: Rope {
            theta: 10000.0,
            head_dim: 64,
            scaling: RopeScaling::Default {},
        },
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        tie_word_embeddings: false,
        max_position_embeddings: 2048,
        bos_token_id: Some(1),
        eos_token_ids: vec![],
        pad_token_id: None,
    };
    let llm = spec.init(&device);
    println!(
        "llama-100m: {} params (random weights)",
        burn::module::Module::num_params(&llm)
    );
    let prompt = 64usize;
    let new = 32usize;
    let ids: Vec<i64> = (0..prompt as i64).map(|i| 100 + i).collect();
    // warm-up: parameters initialize lazily on first use
    let _ = to_vec(llm.forward_embeds(
        llm.embed(int_tensor(ids.clone(), [1, prompt], &device)),
        &[(0..prompt as i64).collect()],
        &[vec![true; prompt]],
        None,
    ));
    let mut cache = KvCache::default();
    let t0 = Instant::now();
    let h = llm.forward_embeds(
        llm.embed(int_tensor(ids, [1, prompt], &device)),
        &[(0..prompt as i64).collect()],
        &[vec![true; prompt]],
        Some(&mut cache),
    );
    let v = to_vec(llm.logits(h.slice([0..1, prompt - 1..prompt, 0..640])));
    let prefill = t0.elapsed().as_secs_f64();
    let mut next = v
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as i64;
    let t1 = Instant::now();
    let mut valid = vec![true; prompt];
    for step in 0..new {
        valid.push(true);
        let h = llm.forward_embeds(
            llm.embed(int_tensor(vec![next], [1, 1], &device)),
            &[vec![(prompt + step) as i64]],
            std::slice::from_ref(&valid),
            Some(&mut cache),
        );
        let v = to_vec(llm.logits(h));
        next = v
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as i64;
    }
    let decode = t1.elapsed().as_secs_f64();
    println!(
        "llama-100m: prefill {prompt} tokens {prefill:.3} s ({:.0} tokens/s); decode {new} tokens {decode:.3} s = {:.1} tokens/s",
        prompt as f64 / prefill,
        new as f64 / decode
    );
}
