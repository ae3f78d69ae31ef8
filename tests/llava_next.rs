//! LLaVA-NeXT (AnyRes high resolution) against transformers' `LlavaNextForConditionalGeneration` and
//! `LlavaNextProcessor` (fixture from tools/make_llava_next_fixture.py: a tiny random model, photos of 3:2, 4:1,
//! 2:7, square and 6×4 pixels): per-image tile and placeholder counts, pixel values, input_ids, logits on one image,
//! two images of different sizes, text only and a left-padded batch, greedy ids and log-probs (library and CLI), the
//! masked loss with the projector's and `image_newline`'s gradients, a save that reloads equal, and a LoRA fine-tune
//! on images of several sizes in one batch that resumes exactly after a kill. LLaVA-OneVision (the same AnyRes with
//! `anyres_max_9` downsampling and untiled multi-image samples; SigLIP + Qwen2) against
//! `LlavaOnevisionForConditionalGeneration` likewise.
mod common;

use burn::tensor::{Device, Tensor};
use common::{Expected, expected, fixture, image, max_abs_diff};
use mitune::checkpoint::hf::llava_spec;
use mitune::checkpoint::{load_llava, save_llava};
use mitune::data::images::{ImageProcessor, load_image};
use mitune::data::tokenizer::TextProcessor;
use mitune::generate::{GenConfig, generate};
use mitune::zoo::layers::{float_tensor, to_vec};
use mitune::zoo::mllm::MmInput;

const NAME: &str = "llava_next";

fn processors() -> (TextProcessor, ImageProcessor) {
    let dir = fixture(NAME);
    let spec = llava_spec(&dir).unwrap();
    let mut text = TextProcessor::load(&dir, spec.image_token_id, spec.image_tokens()).unwrap();
    text.configure(&spec);
    let mut images = ImageProcessor::load(&dir).unwrap();
    images.configure(&spec);
    (text, images)
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap()
}

/// transformers' tiles of the named photos, stacked in order: [Σ tiles, 3, 32, 32].
fn hf_pixels(e: &Expected, names: &[String], device: &Device) -> Option<Tensor<4>> {
    if names.is_empty() {
        return None;
    }
    let mut all = vec![];
    let mut n = 0;
    for name in names {
        let (s, v) = e.tensor(&format!("preprocess.{name}"));
        n += s[0];
        all.extend(v);
    }
    Some(float_tensor(all, [n, 3, 32, 32], device))
}

fn case_input(e: &Expected, case: &str, device: &Device) -> MmInput {
    let m = &e.meta[case];
    let ids: Vec<Vec<i64>> = serde_json::from_value(m["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<i64>> = serde_json::from_value(m["attention_mask"].clone()).unwrap();
    let attention = mask
        .iter()
        .map(|r| r.iter().map(|&x| x == 1).collect())
        .collect();
    let sizes: Vec<[u32; 2]> = m
        .get("image_sizes")
        .map(|s| serde_json::from_value(s.clone()).unwrap())
        .unwrap_or_default();
    MmInput::new(ids, attention, hf_pixels(e, &strings(&m["images"]), device)).with_sizes(sizes)
}

#[test]
fn llava_next_processing_matches_transformers() {
    let e = expected(NAME);
    let spec = llava_spec(&fixture(NAME)).unwrap();
    let a = spec.anyres.clone().expect("llava_next is AnyRes");
    assert_eq!((a.tile, a.grid), (32, 4));
    let (text, images) = processors();
    for (name, want) in e.meta["preprocess"].as_object().unwrap() {
        let img = load_image(&image(name)).unwrap();
        let [h, w] = [img.height(), img.width()];
        assert_eq!(
            [h as i64, w as i64],
            [
                want["size"][0].as_i64().unwrap(),
                want["size"][1].as_i64().unwrap()
            ]
        );
        assert_eq!(
            a.tiles(h, w, true) as u64,
            want["tiles"].as_u64().unwrap(),
            "{name}: tiles"
        );
        assert_eq!(
            spec.image_tokens_for(h, w, true) as u64,
            want["tokens"].as_u64().unwrap(),
            "{name}: placeholder count"
        );
        let (got, th, tw) = images.preprocess(&img).unwrap();
        let (shape, hf) = e.tensor(&format!("preprocess.{name}"));
        assert_eq!([th as usize, tw as usize], [shape[2], shape[3]]);
        assert_eq!(got.len(), hf.len(), "{name}: tile count");
        let err = max_abs_diff(&got, &hf);
        eprintln!(
            "{name} {h}x{w}: {} tiles, {} tokens, pixels max |Δ| {err:.3}",
            shape[0], want["tokens"]
        );
        assert!(err < 0.05, "{name}: pixel values differ by {err}");
    }
    // input_ids: each marker expanded by its own image's size (padding stripped)
    for case in ["image_text", "two_images", "text_only", "batch"] {
        let m = &e.meta[case];
        let names = strings(&m["images"]);
        let per_row = if case == "batch" { 1 } else { names.len() };
        for (r, prompt) in strings(&m["prompts"]).iter().enumerate() {
            let mine: Vec<_> = names
                .iter()
                .skip(r * per_row)
                .take(per_row)
                .map(|n| image(n))
                .collect();
            let sizes = ImageProcessor::sizes(&mine).unwrap();
            let ids = text.encode_sized(prompt, true, &sizes).unwrap();
            let want = common::unpadded(&m["input_ids"][r], &m["attention_mask"][r]);
            assert_eq!(ids, want, "{case} row {r}: input_ids");
        }
    }
    // a marker without its image's size is an error, not a guess
    assert!(text.encode("USER: <image> hi", true).is_err());
}

#[test]
fn llava_next_logits_and_greedy_ids_match_transformers() {
    let device = Device::flex();
    let dir = fixture(NAME);
    let e = expected(NAME);
    let model = load_llava(&dir, &device).unwrap();
    for case in ["image_text", "two_images", "text_only", "batch"] {
        let input = case_input(&e, case, &device);
        let got = to_vec(model.forward(&input).unwrap());
        let (shape, want) = e.tensor(&format!("{case}.logits"));
        let cols: Vec<usize> =
            serde_json::from_value(e.meta[case]["logit_columns"].clone()).unwrap();
        let err = common::column_logit_err(&got, &want, &input.attention, &cols, shape[2]);
        eprintln!("llava_next {case}: max |Δlogit| {err:.2e}");
        assert!(err <= 1e-4, "{case}: logits differ by {err}");
        if case == "image_text" {
            // image_newline reaches the logits (so the comparison above can fail on the packing)
            let mut other = load_llava(&dir, &device).unwrap();
            let nl = other.image_newline.take().unwrap();
            other.image_newline = Some(nl.map(|t| t.zeros_like()));
            let changed = to_vec(other.forward(&input).unwrap());
            assert!(
                max_abs_diff(&changed, &got) > 1e-3,
                "image_newline changes nothing"
            );
        }
    }
    // the wrong size for an image is caught before any compute
    let mut bad = case_input(&e, "image_text", &device);
    bad.image_sizes = vec![[75, 50]];
    assert!(model.forward(&bad).is_err());

    let g = &e.meta["greedy"];
    let ids: Vec<i64> = serde_json::from_value(g["input_ids"].clone()).unwrap();
    let px = hf_pixels(&e, &strings(&g["images"]), &device);
    let cfg = GenConfig::greedy(8, model.spec.llm.eos_token_ids.clone());
    let out = generate(
        &model,
        MmInput::single(ids, px).with_sizes(vec![[32, 32]]),
        &cfg,
        |_| {},
    )
    .unwrap();
    let want: Vec<i64> = serde_json::from_value(g["output_ids"].clone()).unwrap();
    assert_eq!(out.output_ids, want, "greedy ids");
    let lp: Vec<f64> = serde_json::from_value(g["logprobs"].clone()).unwrap();
    for (a, b) in out.logprobs.iter().zip(&lp) {
        assert!(
            (a - b).abs() <= 1e-4,
            "log-probs {:?} vs {lp:?}",
            out.logprobs
        );
    }
    // `mitune generate --raw --json` preprocesses the photo and counts its tokens itself
    let img = image("astronaut_32.png");
    let got = common::cli_json(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        g["prompt"].as_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--raw",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(got["input_ids"], g["input_ids"]);
    assert_eq!(got["output_ids"], g["output_ids"]);
    for (a, b) in got["logprobs"].as_array().unwrap().iter().zip(&lp) {
        assert!(
            (a.as_f64().unwrap() - b).abs() <= 1e-4,
            "CLI log-probs {got} vs {lp:?}"
        );
    }

    // saved by mitune (LLaVA-NeXT layout), reloaded: equal logits; tools/make_llava_next_fixture.py roundtrip
    // loads the same directory in transformers
    let out = std::env::temp_dir().join("mitune-llava-next-saved");
    save_llava(&model, &out, safetensors::Dtype::F32, Some(&dir)).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llava_next");
    let back = load_llava(&out, &device).unwrap();
    let input = case_input(&e, "two_images", &device);
    let a = to_vec(model.forward(&input).unwrap());
    let b = to_vec(back.forward(&input).unwrap());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// transformers: `model(..., labels).loss` with the prompt masked, `.backward()`; the gradients of
/// `multi_modal_projector.linear_1.weight` and `image_newline` within 1e-3 relative.
#[test]
fn llava_next_loss_and_gradients_match_transformers() {
    anyres_loss_and_gradients(NAME);
}

/// The loss case's masked loss and the gradients of `linear_1` and `image_newline` for an AnyRes fixture.
fn anyres_loss_and_gradients(name: &str) {
    let device = Device::flex().autodiff();
    let e = expected(name);
    let model = load_llava(&fixture(name), &device).unwrap();
    let m = &e.meta["loss"];
    let labels: Vec<i64> = serde_json::from_value(m["labels"].clone()).unwrap();
    let ids: Vec<i64> = serde_json::from_value(m["input_ids"].clone()).unwrap();
    let sizes: Vec<[u32; 2]> = serde_json::from_value(m["image_sizes"].clone()).unwrap();
    let px = hf_pixels(&e, &strings(&m["images"]), &device);
    let logits = model
        .forward(&MmInput::single(ids, px).with_sizes(sizes))
        .unwrap();
    let loss = common::masked_loss(logits, &labels);
    let got = to_vec(loss.clone())[0];
    let want = m["loss"].as_f64().unwrap() as f32;
    assert!((got - want).abs() < 1e-4, "loss {got} vs {want}");
    let grads = loss.backward();
    let rel = |g: Vec<f32>, key: &str| common::rel_err(&g, &e.tensor(key).1);
    let w = model.multi_modal_projector.as_mlp().unwrap().layers[0]
        .weight
        .val();
    let g1 = rel(
        to_vec(w.grad(&grads).unwrap().transpose()),
        "loss.grad_linear_1_weight",
    );
    let nl = model.image_newline.as_ref().unwrap().val();
    let g2 = rel(to_vec(nl.grad(&grads).unwrap()), "loss.grad_image_newline");
    eprintln!(
        "{name}: loss {got} vs {want}; grad rel err linear_1 {g1:.2e}, image_newline {g2:.2e}"
    );
    assert!(g1 < 1e-3 && g2 < 1e-3, "gradients differ: {g1}, {g2}");
}

/// A LoRA instruct stage on a LLaVA-NeXT directory with images of five sizes (so every micro-batch has rows of
/// different image token counts) runs, a killed run resumes to the same losses, and the stage's model is a
/// LLaVA-NeXT directory again. A sample whose image tokens cannot fit max_len is reported, not truncated.
#[test]
fn llava_next_fine_tunes_on_mixed_sizes_and_resumes() {
    let dir = fixture(NAME);
    let d = common::scratch("llava-next-train");
    let names = [
        "chelsea_75x50.png",
        "wide_120x30.png",
        "tall_20x70.png",
        "tiny_6x4.png",
        "astronaut_32.png",
    ];
    let data = common::mixed_size_data(&d, &names);
    let recipe = |out: &str, max_len: usize| {
        common::lora_recipe("nx", &d.join(out), &dir, &data, "vicuna_v1", max_len)
    };
    let (la, lb) = common::train_kill_resume(&d, "nx", "lora", |out| recipe(out, 256));
    assert_eq!(la.len(), 4);
    assert_eq!(la, lb, "resumed losses differ");
    let model = d.join("runs-a/nx/lora/model");
    let spec = llava_spec(&model).unwrap();
    assert!(spec.anyres.is_some());
    load_llava(&model, &Device::flex()).unwrap();
    // the tall photo needs 76 image tokens: with max_len 60 its samples cannot fit and are named
    let c = d.join("c.toml");
    std::fs::write(&c, recipe("runs-c", 60)).unwrap();
    let (ok, err) = common::run_mitune(&["validate", c.to_str().unwrap(), "--data"], None);
    assert!(!ok || err.contains("image tokens"), "{err}");
    assert!(err.contains("would cut image tokens"), "{err}");
}

/// The preference and RL stages and `eval` on a LLaVA-NeXT directory: DPO, then GRPO (images tiled in rollouts),
/// then an eval stage (VQA and POPE through generation) all run; the DPO stage's model is LLaVA-NeXT again.
#[test]
fn llava_next_dpo_grpo_and_eval_stages_run() {
    let dir = fixture(NAME);
    let d = common::scratch("llava-next-pref");
    let w = common::world(&d);
    let model = format!("from = {:?}", dir.display().to_string());
    let recipe = common::pref_rl_eval_recipe("nxp", &d.join("runs"), &model, "vicuna_v1", &w);
    let r = d.join("p.toml");
    std::fs::write(&r, recipe).unwrap();
    let (ok, err) = common::run_mitune(&["train", r.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let losses = common::losses(&d.join("runs/nxp"));
    assert!(losses.iter().any(|((s, _), _)| s == "dpo"), "{losses:?}");
    assert!(losses.iter().any(|((s, _), _)| s == "grpo"), "{losses:?}");
    let spec = llava_spec(&d.join("runs/nxp/dpo/model")).unwrap();
    assert!(spec.anyres.is_some());
}

const OV: &str = "llava_onevision";

fn ov_input(e: &Expected, case: &str, device: &Device) -> MmInput {
    let m = &e.meta[case];
    let ids: Vec<Vec<i64>> = serde_json::from_value(m["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<i64>> = serde_json::from_value(m["attention_mask"].clone()).unwrap();
    let attention = mask
        .iter()
        .map(|r| r.iter().map(|&x| x == 1).collect())
        .collect();
    let sizes: Vec<[u32; 2]> = m
        .get("image_sizes")
        .map(|s| serde_json::from_value(s.clone()).unwrap())
        .unwrap_or_default();
    let per_row: Vec<usize> = serde_json::from_value(m["images_per_row"].clone()).unwrap();
    let names = strings(&m["images"]);
    // a multi-image sample's tiles are its own (one padded square each); lone images' are under `preprocess`
    let px = if names.len() > 1 && per_row.len() == 1 {
        let (s, v) = e.tensor(&format!("{case}.pixel_values"));
        Some(float_tensor(v, [s[0], s[1], s[2], s[3]], device))
    } else {
        hf_pixels(e, &names, device)
    };
    MmInput::new(ids, attention, px).with_rows(sizes, per_row)
}

#[test]
fn llava_onevision_matches_transformers() {
    let device = Device::flex();
    let dir = fixture(OV);
    let e = expected(OV);
    let spec = llava_spec(&dir).unwrap();
    let a = spec.anyres.clone().expect("llava_onevision is AnyRes");
    assert_eq!((a.max_tiles, a.single_tile_in_multi), (Some(9), true));
    let mut text = TextProcessor::load(&dir, spec.image_token_id, spec.image_tokens()).unwrap();
    text.configure(&spec);
    let mut images = ImageProcessor::load(&dir).unwrap();
    images.configure(&spec);
    for (name, want) in e.meta["preprocess"].as_object().unwrap() {
        let img = load_image(&image(name)).unwrap();
        let [h, w] = [img.height(), img.width()];
        assert_eq!(
            a.tiles(h, w, true) as u64,
            want["tiles"].as_u64().unwrap(),
            "{name}: tiles"
        );
        assert_eq!(
            spec.image_tokens_for(h, w, true) as u64,
            want["tokens"].as_u64().unwrap(),
            "{name}: placeholder count"
        );
        let Ok((shape, hf)) = e
            .store
            .get(&format!("preprocess.{name}"))
            .map(|l| (l.shape, l.values))
        else {
            continue;
        };
        let (got, _, _) = images.preprocess(&img).unwrap();
        assert_eq!(got.len(), hf.len(), "{name}: {} tiles", shape[0]);
        let err = max_abs_diff(&got, &hf);
        eprintln!(
            "onevision {name} {h}x{w}: {} tiles, {} tokens, pixels max |Δ| {err:.3}",
            shape[0], want["tokens"]
        );
        assert!(err < 0.05, "{name}: pixel values differ by {err}");
    }
    // the two-image sample: each image one padded square (mean-colour background)
    let two = &e.meta["two_images"];
    let paths: Vec<_> = strings(&two["images"]).iter().map(|n| image(n)).collect();
    let got = to_vec(images.batch(&paths, &device).unwrap().unwrap());
    let (_, hf) = e.tensor("two_images.pixel_values");
    assert!(max_abs_diff(&got, &hf) < 0.05, "multi-image tiles differ");

    let model = load_llava(&dir, &device).unwrap();
    for case in ["image_text", "big", "two_images", "batch"] {
        let m = &e.meta[case];
        // input_ids: each marker expanded by its image's size, or one tile + newline in a multi-image sample
        let names = strings(&m["images"]);
        let per_row: Vec<usize> = serde_json::from_value(m["images_per_row"].clone()).unwrap();
        let mut k = 0;
        for (r, prompt) in strings(&m["prompts"]).iter().enumerate() {
            let mine: Vec<_> = names[k..k + per_row[r]].iter().map(|n| image(n)).collect();
            k += per_row[r];
            let ids = text
                .encode_sized(prompt, true, &ImageProcessor::sizes(&mine).unwrap())
                .unwrap();
            let want = common::unpadded(&m["input_ids"][r], &m["attention_mask"][r]);
            assert_eq!(ids, want, "{case} row {r}: input_ids");
        }
        let input = ov_input(&e, case, &device);
        let got = to_vec(model.forward(&input).unwrap());
        let (shape, want) = e.tensor(&format!("{case}.logits"));
        let cols: Vec<usize> = serde_json::from_value(m["logit_columns"].clone()).unwrap();
        let err = common::column_logit_err(&got, &want, &input.attention, &cols, shape[2]);
        eprintln!("llava_onevision {case}: max |Δlogit| {err:.2e}");
        assert!(err <= 1e-4, "{case}: logits differ by {err}");
    }
    let g = &e.meta["greedy"];
    let ids: Vec<i64> = serde_json::from_value(g["input_ids"].clone()).unwrap();
    let px = hf_pixels(&e, &strings(&g["images"]), &device);
    let cfg = GenConfig::greedy(8, model.spec.llm.eos_token_ids.clone());
    let out = generate(
        &model,
        MmInput::single(ids, px).with_sizes(vec![[32, 32]]),
        &cfg,
        |_| {},
    )
    .unwrap();
    let want: Vec<i64> = serde_json::from_value(g["output_ids"].clone()).unwrap();
    assert_eq!(out.output_ids, want, "greedy ids");
    let lp: Vec<f64> = serde_json::from_value(g["logprobs"].clone()).unwrap();
    for (a, b) in out.logprobs.iter().zip(&lp) {
        assert!(
            (a - b).abs() <= 1e-4,
            "log-probs {:?} vs {lp:?}",
            out.logprobs
        );
    }
    // `mitune generate --raw --json` preprocesses and counts itself
    let img = image("astronaut_32.png");
    let got = common::cli_json(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        g["prompt"].as_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--raw",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(got["input_ids"], g["input_ids"]);
    assert_eq!(got["output_ids"], g["output_ids"]);
    for (a, b) in got["logprobs"].as_array().unwrap().iter().zip(&lp) {
        assert!(
            (a.as_f64().unwrap() - b).abs() <= 1e-4,
            "CLI log-probs {got} vs {lp:?}"
        );
    }
    // saved by mitune, reloaded: equal logits; tools/make_llava_onevision_fixture.py roundtrip loads it in
    // transformers
    let out = std::env::temp_dir().join("mitune-llava-ov-saved");
    save_llava(&model, &out, safetensors::Dtype::F32, Some(&dir)).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llava_onevision");
    assert_eq!(cfg["vision_aspect_ratio"], "anyres_max_9");
    let back = load_llava(&out, &device).unwrap();
    let input = ov_input(&e, "big", &device);
    let a = to_vec(model.forward(&input).unwrap());
    let b = to_vec(back.forward(&input).unwrap());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// The masked loss on the large photo (its grid downsampled by anyres_max_9) and the gradients of the projector
/// and `image_newline` through the bilinear downsampling, against transformers.
#[test]
fn llava_onevision_loss_and_gradients_match_transformers() {
    anyres_loss_and_gradients(OV);
}

/// LLaVA-OneVision trains on a mix of one-image samples (tiled, downsampled when large) and two-image samples
/// (one padded-square tile each) in the same micro-batches, and validates the mix's token counts up front.
#[test]
fn llava_onevision_trains_on_single_and_multi_image_samples() {
    let dir = fixture(OV);
    let d = common::scratch("llava-ov-train");
    let records: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            if i % 2 == 0 {
                serde_json::json!({"id": format!("one{i}"), "image": image(["big_128.png", "chelsea_75x50.png"][i % 4 / 2]).display().to_string(),
                    "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]})
            } else {
                serde_json::json!({"id": format!("two{i}"), "images": [image("wide_120x30.png").display().to_string(), image("tiny_6x4.png").display().to_string()],
                    "conversations": [{"from": "human", "value": "<image><image>\nCompare."}, {"from": "gpt", "value": "Both are small."}]})
            }
        })
        .collect();
    let data = d.join("mixed.json");
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let recipe = format!(
        r#"name = "ov"
seed = 1
pipeline = ["sft"]
output = {out:?}
[model]
from = {dir:?}
[stages.sft]
kind = "instruct"
data = {{ sources = [{{ kind = "llava_json", path = {data:?} }}] }}
template = "chatml"
batch = {{ global = 4, micro = 4 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
train = ["connector"]
max_steps = 2
max_len = 512
log_every = 1
"#,
        out = d.join("runs").display().to_string(),
        dir = dir.display().to_string(),
        data = data.display().to_string(),
    );
    let r = d.join("ov.toml");
    std::fs::write(&r, recipe).unwrap();
    let (ok, err) = common::run_mitune(&["validate", r.to_str().unwrap(), "--data"], None);
    assert!(ok, "{err}");
    let (ok, err) = common::run_mitune(&["train", r.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert_eq!(common::losses(&d.join("runs/ov")).len(), 2);
    let spec = llava_spec(&d.join("runs/ov/sft/model")).unwrap();
    assert_eq!(spec.anyres.unwrap().max_tiles, Some(9));
}
