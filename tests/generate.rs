//! Batched KV-cache decoding: left-padded greedy batches give transformers' ids (fixtures made by
//! tools/make_generate_fixture.py) and the same ids as one prompt at a time; seeded sampling is reproducible
//! and does not depend on the batch a prompt is in; stop strings end a row.
mod common;

use burn::tensor::Device;
use common::*;
use mitune::checkpoint::load_llava;
use mitune::data::images::ImageProcessor;
use mitune::data::tokenizer::TextProcessor;
use mitune::generate::{GenConfig, Prompt, generate_batch, generate_groups};
use mitune::zoo::mllm::Llava;

struct Case {
    model: Llava,
    rows: Vec<(Vec<i64>, Vec<std::path::PathBuf>, Vec<i64>)>,
    images: ImageProcessor,
    text: TextProcessor,
}

fn case(name: &str, device: &Device) -> Case {
    let dir = fixture(name);
    let model = load_llava(&dir, device).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generate_batch.json")).unwrap())
            .unwrap();
    let ids = |x: &serde_json::Value| -> Vec<i64> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    };
    let rows = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let imgs = r["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| image(f.as_str().unwrap()))
                .collect();
            (ids(&r["input_ids"]), imgs, ids(&r["output_ids"]))
        })
        .collect();
    let text =
        TextProcessor::load(&dir, model.spec.image_token_id, model.spec.image_tokens()).unwrap();
    Case {
        model,
        rows,
        images: ImageProcessor::load(&dir).unwrap(),
        text,
    }
}

fn prompts(c: &Case, which: &[usize], device: &Device) -> Vec<Prompt> {
    which
        .iter()
        .map(|&i| Prompt {
            instructions: vec![],
            ids: c.rows[i].0.clone(),
            pixels: c.images.batch(&c.rows[i].1, device).unwrap(),
            sizes: vec![],
            videos: None,
            index: i as u64,
        })
        .collect()
}

#[test]
fn batched_greedy_matches_transformers_and_one_by_one() {
    let device = Device::flex();
    for name in MODELS {
        let c = case(name, &device);
        let cfg = GenConfig::greedy(8, c.model.spec.llm.eos_token_ids.clone());
        let all: Vec<usize> = (0..c.rows.len()).collect();
        let batched =
            generate_batch(&c.model, prompts(&c, &all, &device), &cfg, None, |_, _| {}).unwrap();
        for (i, g) in batched.iter().enumerate() {
            assert_eq!(g.output_ids, c.rows[i].2, "{name}: row {i} vs transformers");
            let alone = generate_batch(&c.model, prompts(&c, &[i], &device), &cfg, None, |_, _| {})
                .unwrap();
            assert_eq!(alone[0].output_ids, g.output_ids, "{name}: row {i} alone");
            for (a, b) in alone[0].logprobs.iter().zip(&g.logprobs) {
                assert!((a - b).abs() < 1e-4, "{name}: row {i} log-prob {a} vs {b}");
            }
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_batch_independent() {
    let device = Device::flex();
    let c = case("llava_clip_llama", &device);
    let cfg = GenConfig {
        temperature: 1.0,
        top_p: 0.95,
        top_k: 50,
        seed: 11,
        ..GenConfig::greedy(8, vec![])
    };
    let all: Vec<usize> = (0..c.rows.len()).collect();
    let run = |which: &[usize], cfg: &GenConfig| {
        generate_batch(&c.model, prompts(&c, which, &device), cfg, None, |_, _| {})
            .unwrap()
            .into_iter()
            .map(|g| g.output_ids)
            .collect::<Vec<_>>()
    };
    let a = run(&all, &cfg);
    assert_eq!(a, run(&all, &cfg), "same seed, same samples");
    assert_eq!(
        a[2],
        run(&[2], &cfg)[0],
        "row 2 alone samples as in the batch"
    );
    let other = GenConfig {
        seed: 12,
        ..cfg.clone()
    };
    assert_ne!(a, run(&all, &other), "another seed, other samples");
    let greedy = run(&all, &GenConfig::greedy(8, vec![]));
    assert_ne!(a, greedy, "sampling at temperature 1 differs from greedy");
}

/// RL rollouts: G completions of a prompt from one prefill whose cache is copied G times sample exactly what G
/// separate copies of the prompt (seeded index, index + 1, …) sample, however rows finish.
#[test]
fn a_group_shares_its_prompt_prefill_and_samples_as_separate_copies() {
    let device = Device::flex();
    for name in MODELS {
        let c = case(name, &device);
        let mut cfg = GenConfig {
            temperature: 1.0,
            seed: 3,
            ..GenConfig::greedy(8, c.model.spec.llm.eos_token_ids.clone())
        };
        let (group, which) = (3, [0usize, 2]);
        let shared = || {
            let mut p = prompts(&c, &which, &device);
            for (i, p) in p.iter_mut().enumerate() {
                p.index = (i * group) as u64;
            }
            p
        };
        // ids sampled early in two rows as stops too, so rows leave the batch at different steps
        let probe = generate_groups(&c.model, shared(), group, &cfg, None, |_, _| {}).unwrap();
        cfg.eos
            .extend([probe[0].output_ids[2], probe[4].output_ids[4]]);
        let g = generate_groups(&c.model, shared(), group, &cfg, None, |_, _| {}).unwrap();
        let mut copies = vec![];
        for (i, &w) in which.iter().enumerate() {
            for k in 0..group {
                let mut p = prompts(&c, &[w], &device).remove(0);
                p.index = (i * group + k) as u64;
                copies.push(p);
            }
        }
        let want = generate_batch(&c.model, copies, &cfg, None, |_, _| {}).unwrap();
        assert_eq!(g.len(), want.len());
        let lens: Vec<usize> = g.iter().map(|x| x.output_ids.len()).collect();
        assert!(
            lens.iter().any(|&l| l < 8),
            "{name}: every row ran to the end: {lens:?}"
        );
        for (r, (a, b)) in g.iter().zip(&want).enumerate() {
            assert_eq!(
                a.output_ids, b.output_ids,
                "{name}: row {r} (lengths {lens:?})"
            );
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!((x - y).abs() < 1e-4, "{name}: row {r} log-prob {x} vs {y}");
            }
        }
    }
}

#[test]
fn stop_strings_end_a_row() {
    let device = Device::flex();
    let c = case("llava_clip_llama", &device);
    // the greedy continuation of row 0, decoded; stop at its third token's text
    let cfg = GenConfig::greedy(8, vec![]);
    let full = &c.rows[0].2;
    let stop = c.text.decode(&full[..3]);
    let stop = stop.trim().to_string();
    assert!(!stop.is_empty());
    let cfg = GenConfig {
        stop: vec![stop.clone()],
        ..cfg
    };
    let decode = |ids: &[i64]| c.text.decode(ids);
    let out = generate_batch(
        &c.model,
        prompts(&c, &[0, 1], &device),
        &cfg,
        Some(&decode),
        |_, _| {},
    )
    .unwrap();
    assert!(out[0].output_ids.len() <= 3, "{:?}", out[0].output_ids);
    assert!(c.text.decode(&out[0].output_ids).contains(&stop));
    assert_eq!(out[0].output_ids[..], full[..out[0].output_ids.len()]);
}
