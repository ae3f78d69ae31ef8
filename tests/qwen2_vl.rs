//! Qwen2-VL (native dynamic resolution, 2-D rotary ViT, 2×2 patch merger, M-RoPE) against transformers'
//! `Qwen2VLForConditionalGeneration` and `Qwen2VLProcessor` (fixture from tools/make_qwen2_vl_fixture.py: a tiny
//! random model with bf16 weights, 8-px patches, a 256..4096-pixel budget): patch grids and placeholder counts per
//! photo, pixel values, input_ids, `get_rope_index` positions and deltas, logits on one image, two images of
//! different sizes, text only and a left-padded batch, greedy ids and log-probs, the masked loss and gradients, and
//! a save that reloads.
mod common;

use burn::tensor::{Device, Tensor};
use common::{Expected, expected, fixture, image, max_abs_diff};
use mitune::checkpoint::hf::llava_spec;
use mitune::checkpoint::{load_llava, save_llava};
use mitune::generate::{GenConfig, generate};
use mitune::zoo::layers::to_vec;
use mitune::zoo::mllm::MmInput;

const NAME: &str = "qwen2_vl";

fn strings(v: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The fixture's first-frame patches as the model reads them.
fn patches(e: &Expected, key: &str, device: &Device) -> Tensor<4> {
    common::qwen_still_patches(e, key, device)
}

fn sizes_of(e: &Expected, names: &[String]) -> Vec<[u32; 2]> {
    names
        .iter()
        .map(|n| serde_json::from_value(e.meta["preprocess"][n]["size"].clone()).unwrap())
        .collect()
}

/// `pe`: the fixture holding the pixel values (Qwen2.5-VL's fixture shares Qwen2-VL's: same processor and photos).
fn case_input_px(e: &Expected, pe: &Expected, case: &str, device: &Device) -> MmInput {
    let m = &e.meta[case];
    let ids: Vec<Vec<i64>> = serde_json::from_value(m["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<i64>> = serde_json::from_value(m["attention_mask"].clone()).unwrap();
    let attention = mask
        .iter()
        .map(|r| r.iter().map(|&x| x == 1).collect())
        .collect();
    let names = strings(&m["images"]);
    let px = (!names.is_empty()).then(|| patches(pe, &format!("{case}.pixel_values"), device));
    let per_row = if case == "batch" {
        vec![1, 1]
    } else {
        vec![names.len()]
    };
    MmInput::new(ids, attention, px).with_rows(sizes_of(e, &names), per_row)
}

#[test]
fn qwen2_vl_logits_positions_and_greedy_match_transformers() {
    logits_positions_and_greedy(NAME);
}

/// Qwen2.5-VL (RMSNorm + SwiGLU ViT with window attention, RMSNorm merger): the same checks.
#[test]
fn qwen2_5_vl_logits_positions_and_greedy_match_transformers() {
    logits_positions_and_greedy("qwen2_5_vl");
}

fn logits_positions_and_greedy(name: &str) {
    let device = Device::flex();
    let dir = fixture(name);
    let e = expected(name);
    let pe = expected(NAME);
    let spec = llava_spec(&dir).unwrap();
    let nr = spec.native.clone().expect("qwen2_vl is native resolution");
    assert_eq!((nr.min_pixels, nr.max_pixels), (256, 4096));
    for (name, want) in e.meta["preprocess"].as_object().unwrap() {
        let [h, w]: [u32; 2] = serde_json::from_value(want["size"].clone()).unwrap();
        let g: [usize; 3] = serde_json::from_value(want["grid_thw"].clone()).unwrap();
        assert_eq!(nr.grid(h, w).unwrap(), g, "{name}: grid");
    }
    let model = load_llava(&dir, &device).unwrap();
    for case in ["image_text", "two_images", "text_only", "batch"] {
        let input = case_input_px(&e, &pe, case, &device);
        if let Some(want) = e.meta[case].get("position_ids") {
            let want: Vec<Vec<Vec<i64>>> = serde_json::from_value(want.clone()).unwrap();
            let (got, deltas) = model.mrope_positions(&input).unwrap().unwrap();
            let b = input.ids.len();
            for a in 0..3 {
                for r in 0..b {
                    assert_eq!(
                        got[a * b + r],
                        want[a][r],
                        "{case}: positions axis {a} row {r}"
                    );
                }
            }
            let wd: Vec<i64> = serde_json::from_value(e.meta[case]["rope_deltas"].clone()).unwrap();
            assert_eq!(deltas, wd, "{case}: rope deltas");
        }
        let got = to_vec(model.forward(&input).unwrap());
        let (shape, want) = e.tensor(&format!("{case}.logits"));
        let cols: Vec<usize> =
            serde_json::from_value(e.meta[case]["logit_columns"].clone()).unwrap();
        let err = common::column_logit_err(&got, &want, &input.attention, &cols, shape[2]);
        eprintln!("{name} {case}: max |Δlogit| {err:.2e}");
        assert!(err <= 1e-4, "{case}: logits differ by {err}");
    }
    let g = &e.meta["greedy"];
    let ids: Vec<i64> = serde_json::from_value(g["input_ids"].clone()).unwrap();
    let names = strings(&g["images"]);
    let px = patches(&pe, "image_text.pixel_values", &device);
    let cfg = GenConfig::greedy(8, model.spec.llm.eos_token_ids.clone());
    let out = generate(
        &model,
        MmInput::single(ids, Some(px)).with_sizes(sizes_of(&e, &names)),
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
    // saved by mitune (Qwen2-VL layout), reloaded: equal logits; tools/make_qwen2_vl_fixture.py roundtrip loads the
    // same directory in transformers
    let out = std::env::temp_dir().join(format!("mitune-{}-saved", name.replace('_', "-")));
    save_llava(&model, &out, safetensors::Dtype::F32, Some(&dir)).unwrap();
    let back = load_llava(&out, &device).unwrap();
    let input = case_input_px(&e, &pe, "two_images", &device);
    let a = to_vec(model.forward(&input).unwrap());
    let b = to_vec(back.forward(&input).unwrap());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let _ = image;
}

/// transformers: `model(..., labels).loss` with the prompt masked; the gradients of the merger's first linear and
/// of the patch embedding within 1e-3 relative.
#[test]
fn qwen2_vl_loss_and_gradients_match_transformers() {
    loss_and_gradients(NAME);
}

#[test]
fn qwen2_5_vl_loss_and_gradients_match_transformers() {
    loss_and_gradients("qwen2_5_vl");
}

fn loss_and_gradients(name: &str) {
    let device = Device::flex().autodiff();
    let e = expected(name);
    let pe = expected(NAME);
    let model = load_llava(&fixture(name), &device).unwrap();
    let m = &e.meta["loss"];
    let labels: Vec<i64> = serde_json::from_value(m["labels"].clone()).unwrap();
    let ids: Vec<i64> = serde_json::from_value(m["input_ids"].clone()).unwrap();
    // the loss image is the batch case's second image (its 64 patches after the tiny one's 8)
    let all = patches(&pe, "batch.pixel_values", &device);
    let [n, c, p, _] = all.dims();
    let px = all.slice([8..n, 0..c, 0..p, 0..p]);
    let names = strings(&m["images"]);
    let logits = model
        .forward(&MmInput::single(ids, Some(px)).with_sizes(sizes_of(&e, &names)))
        .unwrap();
    let (got, g1, g2) = common::qwen_loss_and_grads(&model, logits, &labels, &e, 32);
    let want = m["loss"].as_f64().unwrap() as f32;
    assert!((got - want).abs() < 1e-4, "loss {got} vs {want}");
    eprintln!(
        "{name}: loss {got} vs {want}; grad rel err merger fc1 {g1:.2e}, patch_embed {g2:.2e}"
    );
    assert!(g1 < 1e-3 && g2 < 1e-3, "gradients differ: {g1}, {g2}");
}

fn processors() -> (
    mitune::data::tokenizer::TextProcessor,
    mitune::data::images::ImageProcessor,
) {
    let dir = fixture(NAME);
    let spec = llava_spec(&dir).unwrap();
    let mut text = mitune::data::tokenizer::TextProcessor::load(
        &dir,
        spec.image_token_id,
        spec.image_tokens(),
    )
    .unwrap();
    text.configure(&spec);
    let mut images = mitune::data::images::ImageProcessor::load(&dir).unwrap();
    images.configure(&spec);
    (text, images)
}

/// The processor side: pixel values of the resized patches (≤ 0.05 of `Qwen2VLImageProcessorPil`), input_ids with
/// each image's `<|image_pad|>` run sized by its grid, the chat template (LLaVA's `<image>` marker becomes Qwen's
/// wrapped marker), and `mitune generate --raw --json` on the fixture.
#[test]
fn qwen2_vl_processing_and_cli_match_transformers() {
    let device = Device::flex();
    let e = expected(NAME);
    let (text, images) = processors();
    assert_eq!(
        text.wrapped_marker(),
        "<|vision_start|><|image_pad|><|vision_end|>"
    );
    for (key, name, range) in [
        ("image_text.pixel_values", "chelsea_75x50.png", 0..60),
        ("batch.pixel_values", "tiny_6x4.png", 0..8),
    ] {
        let img = mitune::data::images::load_image(&image(name)).unwrap();
        let (got, _, _) = images.preprocess(&img).unwrap();
        let hf = to_vec(patches(&e, key, &device));
        let per = 6 * 8 * 8;
        let want = &hf[range.start * per..range.end * per];
        assert_eq!(got.len(), want.len(), "{name}: patch count");
        let err = max_abs_diff(&got, want);
        eprintln!(
            "qwen2_vl {name}: {} patches, pixels max |Δ| {err:.3}",
            got.len() / per
        );
        assert!(err < 0.05, "{name}: pixel values differ by {err}");
    }
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
            let sizes = mitune::data::images::ImageProcessor::sizes(&mine).unwrap();
            let ids = text.encode_sized(prompt, false, &sizes).unwrap();
            let want = common::unpadded(&m["input_ids"][r], &m["attention_mask"][r]);
            assert_eq!(ids, want, "{case} row {r}: input_ids");
        }
    }
    let chat = &e.meta["chat"];
    let rendered = text
        .render_chat(
            &[("user".into(), chat["user"].as_str().unwrap().into())],
            true,
        )
        .unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());

    let g = &e.meta["greedy"];
    let (dir, img) = (fixture(NAME), image("chelsea_75x50.png"));
    let got = common::cli_json(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        chat["user"].as_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(
        got["input_ids"], g["input_ids"],
        "chat-templated prompt ids"
    );
    // the photo is resampled (bicubic here and in PIL differ by ≤ 0.05 per pixel): ids equal, log-probs close
    assert_eq!(got["output_ids"], g["output_ids"]);
    for (a, b) in got["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["logprobs"].as_array().unwrap())
    {
        assert!(
            (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-2,
            "CLI log-probs {got}"
        );
    }
}

/// A LoRA fine-tune of the Qwen2-VL directory on LLaVA-format data (`<image>` markers, images of five sizes)
/// through the model's own chat template validates, runs, resumes exactly after a kill, and saves a Qwen2-VL
/// directory.
#[test]
fn qwen2_vl_fine_tunes_with_lora_and_resumes() {
    let dir = fixture(NAME);
    let d = common::scratch("qwen2-vl-train");
    let names = [
        "chelsea_75x50.png",
        "wide_120x30.png",
        "tall_20x70.png",
        "tiny_6x4.png",
        "big_128.png",
    ];
    let data = common::mixed_size_data(&d, &names);
    let recipe = |out: &str| common::lora_recipe("qv", &d.join(out), &dir, &data, "tokenizer", 256);
    std::fs::write(d.join("a.toml"), recipe("runs-a")).unwrap();
    let (ok, err) = common::run_mitune(
        &["validate", d.join("a.toml").to_str().unwrap(), "--data"],
        None,
    );
    assert!(ok, "{err}");
    let (la, lb) = common::train_kill_resume(&d, "qv", "lora", recipe);
    assert_eq!(la.len(), 4);
    assert_eq!(la, lb, "resumed losses differ");
    let model = d.join("runs-a/qv/lora/model");
    assert!(llava_spec(&model).unwrap().native.is_some());
    load_llava(&model, &Device::flex()).unwrap();
}

/// DPO then GRPO (rollouts generate with M-RoPE deltas) then an eval stage on the Qwen2-VL directory, with a
/// `model.max_pixels` override: all run, and the DPO stage's model is Qwen2-VL with the overridden budget.
#[test]
fn qwen2_vl_dpo_grpo_and_eval_stages_run() {
    let dir = fixture(NAME);
    let d = common::scratch("qwen2-vl-pref");
    let w = common::world(&d);
    let model = format!("from = {:?}\nmax_pixels = 1024", dir.display().to_string());
    let recipe = common::pref_rl_eval_recipe("qp", &d.join("runs"), &model, "tokenizer", &w);
    let r = d.join("p.toml");
    std::fs::write(&r, recipe).unwrap();
    let (ok, err) = common::run_mitune(&["train", r.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let losses = common::losses(&d.join("runs/qp"));
    assert!(losses.iter().any(|((s, _), _)| s == "dpo"), "{losses:?}");
    assert!(losses.iter().any(|((s, _), _)| s == "grpo"), "{losses:?}");
    let spec = llava_spec(&d.join("runs/qp/dpo/model")).unwrap();
    assert_eq!(spec.native.unwrap().max_pixels, 1024);
    // a budget below its floor is a located error before any compute
    let bad = std::fs::read_to_string(&r)
        .unwrap()
        .replace("max_pixels = 1024", "max_pixels = 100");
    std::fs::write(&r, bad).unwrap();
    let (ok, err) = common::run_mitune(&["validate", r.to_str().unwrap()], None);
    assert!(!ok && err.contains("model.max_pixels"), "{err}");
}

/// A stage's own pixel budget (`stages.NAME.data.max_pixels`): `validate --data` counts image tokens with it, the
/// stage trains with it and its model carries it; a budget below its floor names the stage's key.
#[test]
fn qwen2_vl_stage_pixel_budget() {
    let dir = fixture(NAME);
    let d = common::scratch("qwen2-vl-budget");
    let records: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            serde_json::json!({"id": format!("s{i}"), "image": image("big_128.png").display().to_string(),
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]})
        })
        .collect();
    let data = d.join("d.json");
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let base = common::lora_recipe("qb", &d.join("runs"), &dir, &data, "tokenizer", 256);
    let with = |max: u64| base.replace("}] }", &format!("}}], max_pixels = {max} }}"));
    let r = d.join("r.toml");
    // the model's budget (4096 px): a 128-px photo is 64×64 -> 16 tokens; the stage's 1024 px: 32×32 -> 4
    std::fs::write(&r, with(1024)).unwrap();
    let (text, _) = common::validate_data(&r);
    assert!(text.contains("min 4, median 4, max 4"), "{text}");
    let (ok, err) = common::run_mitune(&["train", r.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let spec = llava_spec(&d.join("runs/qb/lora/model")).unwrap();
    assert_eq!(spec.native.unwrap().max_pixels, 1024);
    std::fs::write(&r, with(100)).unwrap();
    let (ok, err) = common::run_mitune(&["validate", r.to_str().unwrap()], None);
    assert!(!ok && err.contains("stages.lora.data.max_pixels"), "{err}");
}

/// One source's own pixel budget inside a stage (`sources = [{ ..., max_pixels = 1024 }, { ... }]`): its images
/// count 4 tokens while the other source's count 16 under the model's budget; batches mixing both train (each
/// image patched at its own source's grid); a bad source budget names the source's key.
#[test]
fn qwen2_vl_source_pixel_budget() {
    let dir = fixture(NAME);
    let d = common::scratch("qwen2-vl-source-budget");
    let records: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            serde_json::json!({"id": format!("s{i}"), "image": image("big_128.png").display().to_string(),
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]})
        })
        .collect();
    let (a, b) = (d.join("a.json"), d.join("b.json"));
    std::fs::write(&a, serde_json::to_string(&records).unwrap()).unwrap();
    std::fs::write(&b, serde_json::to_string(&records).unwrap()).unwrap();
    let base = common::lora_recipe("qs", &d.join("runs"), &dir, &a, "tokenizer", 256);
    let with = |max: u64| {
        base.replace(
            &format!("path = {:?} }}]", a.display().to_string()),
            &format!(
                "path = {:?}, max_pixels = {max} }}, {{ kind = \"llava_json\", path = {:?} }}]",
                a.display().to_string(),
                b.display().to_string()
            ),
        )
    };
    let r = d.join("r.toml");
    std::fs::write(&r, with(1024)).unwrap();
    let (text, _) = common::validate_data(&r);
    assert!(text.contains("(8): min 4, median 16, max 16"), "{text}");
    let (ok, err) = common::run_mitune(&["train", r.to_str().unwrap()], None);
    assert!(ok, "{err}");
    assert_eq!(common::losses(&d.join("runs/qs")).len(), 4);
    std::fs::write(&r, with(100)).unwrap();
    let (ok, err) = common::run_mitune(&["validate", r.to_str().unwrap()], None);
    assert!(
        !ok && err.contains("stages.lora.data.sources[0].max_pixels"),
        "{err}"
    );
}
