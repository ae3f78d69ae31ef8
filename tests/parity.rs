//! Golden-value tests against transformers 5.23 (fixtures made by tools/make_fixtures.py): logits, greedy ids,
//! log-probs, masked loss and a connector gradient, image preprocessing, chat templating. On the device
//! `MITUNE_DEVICE` names (flex when unset): CI runs them again with `MITUNE_DEVICE=wgpu` on Mesa's lavapipe.
mod common;

use common::*;
use mitune::checkpoint::load_llava;
use mitune::data::images::ImageProcessor;
use mitune::data::tokenizer::TextProcessor;
use mitune::generate::{GenConfig, generate};
use mitune::zoo::layers::{float_tensor, int_tensor, to_vec};
use mitune::zoo::mllm::MmInput;

/// transformers: `model(input_ids, pixel_values).logits[0]` — f32 within 1e-4 (the fixture keeps each row's last
/// 16 positions).
#[test]
fn logits_match_transformers() {
    let device = mitune::default_device();
    for name in MODELS {
        let model = load_llava(&fixture(name), &device).unwrap();
        let e = expected(name);
        for (case, px) in [
            ("image_text", true),
            ("text_only", false),
            ("two_images", true),
        ] {
            let p = px.then(|| pixels(&e, &format!("{case}.pixel_values"), &device));
            let logits = model.forward(&MmInput::single(e.ids(case), p)).unwrap();
            let vocab = logits.dims()[2];
            let (_, want) = e.tensor(&format!("{case}.logits"));
            let err = max_abs_diff(&logit_tail(&to_vec(logits), 1, vocab, LOGIT_TAIL), &want);
            eprintln!("{name}/{case}: max |Δlogit| = {err:.2e}");
            assert!(err < 1e-4, "{name}/{case}: max |Δlogit| = {err}");
        }
    }
}

/// A left-padded batch with one image row and one text-only row; compared where attention_mask = 1.
#[test]
fn padded_batch_matches_transformers() {
    let device = mitune::default_device();
    for name in MODELS {
        let model = load_llava(&fixture(name), &device).unwrap();
        let e = expected(name);
        let rows = |k: &str| -> Vec<Vec<i64>> {
            e.meta["batch"][k]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_i64().unwrap())
                        .collect()
                })
                .collect()
        };
        let ids = rows("input_ids");
        let mask = rows("attention_mask");
        let attention: Vec<Vec<bool>> = mask
            .iter()
            .map(|r| r.iter().map(|&m| m == 1).collect())
            .collect();
        let input = MmInput::new(
            ids,
            attention.clone(),
            Some(pixels(&e, "batch.pixel_values", &device)),
        );
        let (shape, want) = e.tensor("batch.logits");
        let (t, v) = (shape[1], shape[2]);
        let got = logit_tail(&to_vec(model.forward(&input).unwrap()), 2, v, t);
        let mut err = 0f32;
        for (b, row) in attention.iter().enumerate() {
            for (i, &real) in row[row.len() - t..].iter().enumerate() {
                if real {
                    let o = (b * t + i) * v;
                    err = err.max(max_abs_diff(&got[o..o + v], &want[o..o + v]));
                }
            }
        }
        eprintln!("{name}/batch: max |Δlogit| = {err:.2e}");
        assert!(err < 1e-4, "{name}: padded batch max |Δlogit| = {err}");
    }
}

/// transformers: `generate(do_sample=False, max_new_tokens=8, output_logits=True)` — same ids, log-probs within 1e-4.
#[test]
fn greedy_generation_matches_transformers() {
    let device = mitune::default_device();
    for name in MODELS {
        let dir = fixture(name);
        let model = load_llava(&dir, &device).unwrap();
        let e = expected(name);
        let text = TextProcessor::load(&dir, model.spec.image_token_id, model.spec.image_tokens())
            .unwrap();
        let g = &e.meta["greedy"];
        let ids = text.encode(g["prompt"].as_str().unwrap(), true).unwrap();
        assert_eq!(ids, e.ids("image_text"), "{name}: raw prompt ids");
        let cfg = GenConfig::greedy(8, model.spec.llm.eos_token_ids.clone());
        let px = pixels(&e, "image_text.pixel_values", &device);
        let out = generate(&model, MmInput::single(ids, Some(px)), &cfg, |_| {}).unwrap();
        let want: Vec<i64> = g["output_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(out.output_ids, want, "{name}: greedy ids");
        for (a, b) in out.logprobs.iter().zip(g["logprobs"].as_array().unwrap()) {
            assert!(
                (a - b.as_f64().unwrap()).abs() < 1e-4,
                "{name}: logprob {a} vs {b}"
            );
        }
    }
}

/// transformers: `model(..., labels).loss` with prompt labels = -100, then `.backward()`;
/// d loss / d multi_modal_projector.linear_1.weight within 1e-3 relative (to the gradient's max magnitude).
#[test]
fn masked_loss_and_connector_gradient_match_transformers() {
    let device = mitune::default_device().autodiff();
    for name in MODELS {
        let model = load_llava(&fixture(name), &device).unwrap();
        let e = expected(name);
        let labels: Vec<i64> = e.meta["loss"]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let ids = e.ids("loss");
        let logits = model
            .forward(&MmInput::single(
                ids,
                Some(pixels(&e, "loss.pixel_values", &device)),
            ))
            .unwrap();
        // loss = mean over scored positions of -log p(label[i+1] | ..i)
        let [b, t, v] = logits.dims();
        let logp = burn::tensor::activation::log_softmax(logits.slice([0..b, 0..t - 1, 0..v]), 2);
        let targets: Vec<i64> = labels[1..].iter().map(|&l| l.max(0)).collect();
        let weights: Vec<f32> = labels[1..]
            .iter()
            .map(|&l| if l >= 0 { 1.0 } else { 0.0 })
            .collect();
        let n: f32 = weights.iter().sum();
        let picked = logp
            .gather(2, int_tensor(targets, [1, t - 1, 1], &device))
            .reshape([1, t - 1]);
        let loss = (picked * float_tensor(weights, [1, t - 1], &device))
            .sum()
            .neg()
            / n;
        let got = to_vec(loss.clone())[0];
        let want_loss = e.meta["loss"]["loss"].as_f64().unwrap() as f32;
        assert!(
            (got - want_loss).abs() < 1e-4,
            "{name}: loss {got} vs {want_loss}"
        );
        let grads = loss.backward();
        let w = model.multi_modal_projector.as_mlp().unwrap().layers[0]
            .weight
            .val();
        let g = w.grad(&grads).expect("connector weight has a gradient");
        let g = to_vec(g.transpose()); // burn [in, out] -> torch [out, in]
        let (_, want) = e.tensor("loss.grad_linear_1_weight");
        let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        let rel = max_abs_diff(&g, &want) / scale;
        eprintln!("{name}: loss {got} vs {want_loss}; connector grad rel err {rel:.2e}");
        assert!(
            rel < 1e-3,
            "{name}: connector gradient relative error {rel}"
        );
    }
}

/// The non-square photo through each model's image processor vs transformers' PIL processor: within 0.05.
#[test]
fn image_preprocessing_matches_transformers() {
    for name in MODELS {
        let e = expected(name);
        let proc = ImageProcessor::load(&fixture(name)).unwrap();
        let img = mitune::data::images::load_image(&image("chelsea_75x50.png")).unwrap();
        let (got, h, w) = proc.preprocess(&img).unwrap();
        let (shape, want) = e.tensor("preprocess.chelsea");
        assert_eq!(
            [h as usize, w as usize],
            [shape[2], shape[3]],
            "{name}: output size"
        );
        let err = max_abs_diff(&got, &want);
        eprintln!("{name}: preprocessing max |Δ| = {err:.3}");
        assert!(err < 0.05, "{name}: preprocessing max |Δ| = {err}");
    }
}

/// One user turn through the checkpoint's chat template + generation prompt gives transformers' ids.
#[test]
fn chat_template_ids_match_transformers() {
    for name in MODELS {
        let dir = fixture(name);
        let e = expected(name);
        let model_cfg = mitune::checkpoint::hf::llava_spec(&dir).unwrap();
        let text =
            TextProcessor::load(&dir, model_cfg.image_token_id, model_cfg.image_tokens()).unwrap();
        let user = e.meta["chat"]["user"].as_str().unwrap();
        let rendered = text
            .render_chat(&[("user".into(), user.into())], true)
            .unwrap();
        assert_eq!(
            rendered,
            e.meta["chat"]["rendered"].as_str().unwrap(),
            "{name}: rendered template"
        );
        assert_eq!(
            text.encode_chat(user).unwrap(),
            e.ids("chat"),
            "{name}: chat ids"
        );
    }
}
