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

/// GRPO's loss family and KTO against plain PyTorch on the fixture model (tools/make_rl_loss_fixture.py: TRL's
/// formulas over transformers' log-probs of three prompt + completion rows, one image each): for every
/// `loss_type` × `importance_sampling_level`, and KTO with its KL baseline and class weights, the loss within 1e-4
/// and the gradients of the connector's first layer and an LLM MLP within 1e-4 of their largest entry.
#[test]
fn grpo_family_and_kto_losses_and_gradients_match_pytorch() {
    use mitune::recipe::schema::{GrpoLoss, SamplingLevel};
    use mitune::stages::grpo::{Norm, Objective, token_loss};
    use mitune::stages::kto::{Kto, kto_losses};
    use mitune::stages::loss;
    let device = mitune::default_device().autodiff();
    let name = "llava_clip_llama";
    let model = load_llava(&fixture(name), &device).unwrap();
    let e = expected_file(name, "rl_losses");
    let m = &e.meta;
    let list = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let rows: Vec<Vec<i64>> = m["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| list(r).iter().map(|&x| x as i64).collect())
        .collect();
    let t = rows.iter().map(Vec::len).max().unwrap();
    let labels: Vec<Vec<bool>> = m["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut l: Vec<bool> = r
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_bool().unwrap())
                .collect();
            l.resize(t, false);
            l
        })
        .collect();
    let attention: Vec<Vec<bool>> = rows
        .iter()
        .map(|r| (0..t).map(|i| i < r.len()).collect())
        .collect();
    let ids: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.resize(t, 3);
            r
        })
        .collect();
    let (shape, px) = e.tensor("pixel_values");
    let pixels = float_tensor(px, [shape[0], shape[1], shape[2], shape[3]], &device);
    let input = MmInput::new(ids.clone(), attention, Some(pixels));
    let n = rows.len();
    // per-row values over positions 1..t, as the stage passes π_old's and the reference's log-probs
    let per_row = |key: &str| -> Vec<Vec<f32>> {
        let (_, v) = e.tensor(key);
        (0..n)
            .map(|i| v[i * (t - 1)..(i + 1) * (t - 1)].to_vec())
            .collect()
    };
    let (old, reference) = (per_row("grpo.old"), per_row("grpo.ref"));
    let adv = list(&m["advantages"]);
    // d loss / d (connector linear_1, layers.1 down_proj), torch layout [out, in]
    let check = |l: burn::tensor::Tensor<1>, want: f64, what: &str, prefix: &str| {
        let got = to_vec(l.clone())[0] as f64;
        assert!(
            (got - want).abs() < 1e-4,
            "{what}: loss {got} vs PyTorch {want}"
        );
        let grads = l.backward();
        let lin = model.multi_modal_projector.as_mlp().unwrap().layers[0]
            .weight
            .val();
        let down = model.language_model.decoder().layers[1]
            .mlp
            .down_proj
            .weight
            .val();
        for (g, key) in [
            (lin.grad(&grads), "linear_1"),
            (down.grad(&grads), "down_proj"),
        ] {
            let g = to_vec(g.expect("a gradient").transpose());
            let (_, want) = e.tensor(&format!("{prefix}.grad.{key}"));
            let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
            let rel = max_abs_diff(&g, &want) / scale;
            assert!(
                rel < 1e-4,
                "{what}: d loss / d {key} relative error {rel:.2e}"
            );
        }
    };
    for (level, lname) in [
        (SamplingLevel::Token, "token"),
        (SamplingLevel::Sequence, "sequence"),
    ] {
        for (kind, kname) in [
            (GrpoLoss::Grpo, "grpo"),
            (GrpoLoss::Bnpo, "bnpo"),
            (GrpoLoss::DrGrpo, "dr_grpo"),
            (GrpoLoss::Dapo, "dapo"),
        ] {
            let hidden = model.hidden(&input).unwrap();
            let head = |h| model.language_model.logits(h);
            let (logp, _) = loss::supervised_token_logps(hidden, head, &ids, &labels, false);
            let mask = loss::target_mask(&labels, &device);
            let tokens: f64 = labels.iter().flatten().filter(|&&x| x).count() as f64;
            let obj = Objective {
                clip_low: m["epsilon"].as_f64().unwrap(),
                clip_high: m["epsilon_high"].as_f64().unwrap(),
                level,
                kl_beta: m["kl_beta"].as_f64().unwrap(),
            };
            let norm = Norm {
                kind,
                rows: n,
                tokens,
                micros: 1,
                max_new_tokens: m["max_new_tokens"].as_u64().unwrap() as usize,
            };
            let (l, _) = token_loss(
                logp,
                mask,
                &adv,
                Some(&old),
                Some(&reference),
                &obj,
                &norm,
                &device,
            );
            let key = format!("{lname}.{kname}");
            check(
                l,
                m["grpo"][&key].as_f64().unwrap(),
                &key,
                &format!("grpo.{key}"),
            );
        }
    }
    let k = &m["kto"];
    let kto = Kto {
        beta: k["beta"].as_f64().unwrap(),
        desirable_weight: k["desirable_weight"].as_f64().unwrap(),
        undesirable_weight: k["undesirable_weight"].as_f64().unwrap(),
    };
    let f32s = |v: &serde_json::Value| -> Vec<f32> { list(v).iter().map(|&x| x as f32).collect() };
    let kto_labels: Vec<bool> = k["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_bool().unwrap())
        .collect();
    let hidden = model.hidden(&input).unwrap();
    let head = |h| model.language_model.logits(h);
    let lp = loss::supervised_logp_rows(hidden, head, &ids, &labels);
    let (losses, z) = kto_losses(
        &kto,
        lp,
        &f32s(&k["reference"]),
        &f32s(&k["kl_policy"]),
        &f32s(&k["kl_reference"]),
        &kto_labels,
        &device,
    );
    assert!(
        (z - k["z"].as_f64().unwrap()).abs() < 1e-5,
        "KL baseline {z}"
    );
    check(
        losses.sum().div_scalar(n as f64),
        k["loss"].as_f64().unwrap(),
        "kto",
        "kto",
    );
}
