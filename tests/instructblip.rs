//! InstructBLIP (BLIP vision tower + instruction-aware Q-Former + LLaMA) against transformers'
//! `InstructBlipForConditionalGeneration` (fixture from tools/make_instructblip_fixture.py): the directory loads as
//! saved, logits match (≤ 1e-4) on an image + prompt and on a right-padded batch of two images with instructions of
//! different lengths, greedy generation gives the same ids and log-probs, and a mitune save reloads equal.
mod common;

use burn::tensor::{Device, Tensor};
use common::{fixture, max_abs_diff};
use mitune::checkpoint::hf::llava_spec;
use mitune::checkpoint::instructblip::is_instructblip;
use mitune::checkpoint::safetensors_io::WeightStore;
use mitune::checkpoint::{load_llava, save_llava};
use mitune::generate::{GenConfig, generate};
use mitune::zoo::layers::{float_tensor, to_vec};
use mitune::zoo::mllm::{Media, MmInput};

struct Case {
    ids: Vec<Vec<i64>>,
    attention: Vec<Vec<bool>>,
    instructions: Vec<Vec<i64>>,
    pixels: Tensor<4>,
    logits: (Vec<usize>, Vec<f32>),
    meta: serde_json::Value,
}

fn case(name: &str, device: &Device) -> Case {
    let dir = fixture("instructblip");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let e = WeightStore::open_files(&[dir.join("expected.safetensors")]).unwrap();
    let m = &meta[name];
    let rows = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(m[k].clone()).unwrap() };
    let ids = rows("input_ids");
    let attention = rows("attention_mask")
        .iter()
        .map(|r| r.iter().map(|&x| x == 1).collect())
        .collect();
    // the processor pads the Q-Former ids; mitune takes each instruction unpadded
    let instructions = rows("qformer_input_ids")
        .into_iter()
        .zip(rows("qformer_attention_mask"))
        .map(|(r, mask)| {
            r.into_iter()
                .zip(mask)
                .filter(|(_, k)| *k == 1)
                .map(|(x, _)| x)
                .collect()
        })
        .collect();
    let px = e.get(&format!("{name}.pixel_values")).unwrap();
    let logits = e.get(&format!("{name}.logits")).unwrap();
    Case {
        ids,
        attention,
        instructions,
        pixels: float_tensor(px.values, px.shape.try_into().unwrap(), device),
        logits: (logits.shape, logits.values),
        meta: m.clone(),
    }
}

fn input(c: &Case) -> MmInput {
    MmInput {
        ids: c.ids.clone(),
        attention: c.attention.clone(),
        media: vec![Media::InstructedImages {
            pixels: c.pixels.clone(),
            instructions: c.instructions.clone(),
        }],
        image_sizes: vec![],
        images_per_row: vec![],
        image_grids: vec![],
        segments: vec![],
    }
}

#[test]
fn instructblip_logits_and_greedy_ids_match_transformers() {
    let device = Device::flex();
    let dir = fixture("instructblip");
    let spec = llava_spec(&dir).unwrap();
    assert!(is_instructblip(&spec));
    assert_eq!(spec.image_tokens(), 4, "num_query_tokens");
    let model = load_llava(&dir, &device).unwrap();
    for name in ["image_text", "batch"] {
        let c = case(name, &device);
        let got = to_vec(model.forward(&input(&c)).unwrap());
        let (shape, want) = &c.logits;
        let (t, v) = (shape[1], shape[2]);
        let mut err = 0f32;
        for (b, row) in c.attention.iter().enumerate() {
            for (i, &real) in row.iter().enumerate() {
                if real {
                    let o = (b * t + i) * v;
                    err = err.max(max_abs_diff(&got[o..o + v], &want[o..o + v]));
                }
            }
        }
        eprintln!("instructblip {name}: max |Δlogit| {err:.2e}");
        assert!(err <= 1e-4, "{name}: logits differ by {err}");
        // the instruction and the image both reach the logits (so the comparison above can fail)
        let mut blind = input(&c);
        blind.media = vec![Media::Images(c.pixels.clone())];
        let other = to_vec(model.forward(&blind).unwrap());
        assert!(
            max_abs_diff(&other, &got) > 1e-3,
            "{name}: the instruction changes nothing"
        );
        let mut dark = input(&c);
        dark.media = vec![Media::InstructedImages {
            pixels: c.pixels.clone().zeros_like(),
            instructions: c.instructions.clone(),
        }];
        let other = to_vec(model.forward(&dark).unwrap());
        assert!(
            max_abs_diff(&other, &got) > 1e-3,
            "{name}: the image changes nothing"
        );
    }
    let c = case("image_text", &device);
    let cfg = GenConfig::greedy(6, model.spec.llm.eos_token_ids.clone());
    let mut inp = input(&c);
    inp.attention = vec![vec![true; c.ids[0].len()]];
    let g = generate(&model, inp, &cfg, |_| {}).unwrap();
    let want: Vec<i64> = serde_json::from_value(c.meta["greedy_ids"].clone()).unwrap();
    assert_eq!(g.output_ids, want, "greedy ids");
    let lp: Vec<f64> = serde_json::from_value(c.meta["greedy_logprobs"].clone()).unwrap();
    for (a, b) in g.logprobs.iter().zip(&lp) {
        assert!(
            (a - b).abs() <= 1e-4,
            "log-probs {:?} vs {lp:?}",
            g.logprobs
        );
    }
    // saved by mitune (InstructBLIP layout), reloaded: equal logits
    let out = std::env::temp_dir().join("mitune-instructblip-saved");
    save_llava(&model, &out, safetensors::Dtype::F32, Some(&dir)).unwrap();
    let back = load_llava(&out, &device).unwrap();
    let a = to_vec(model.forward(&input(&c)).unwrap());
    let b = to_vec(back.forward(&input(&c)).unwrap());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// `mitune generate --raw --json` on the fixture gives the processor's input_ids (query placeholders first, before
/// BOS), transformers' greedy ids and log-probs; the Q-Former instruction ids are the processor's for both prompts.
#[test]
fn instructblip_processor_and_cli_generate_match_transformers() {
    let dir = fixture("instructblip");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let spec = llava_spec(&dir).unwrap();
    let text = mitune::data::tokenizer::TextProcessor::load(
        &dir,
        spec.image_token_id,
        spec.image_tokens(),
    )
    .unwrap();
    let b = &meta["batch"];
    for (i, prompt) in b["prompts"].as_array().unwrap().iter().enumerate() {
        let (ids, ins) = text
            .encode_images_first(prompt.as_str().unwrap(), 1, false)
            .unwrap();
        let mask: Vec<i64> = serde_json::from_value(b["attention_mask"][i].clone()).unwrap();
        let want: Vec<i64> = serde_json::from_value(b["input_ids"][i].clone()).unwrap();
        let want: Vec<i64> = want
            .into_iter()
            .zip(&mask)
            .filter(|(_, m)| **m == 1)
            .map(|(x, _)| x)
            .collect();
        assert_eq!(ids, want, "prompt {i}: input_ids");
        let qmask: Vec<i64> =
            serde_json::from_value(b["qformer_attention_mask"][i].clone()).unwrap();
        let qwant: Vec<i64> = serde_json::from_value(b["qformer_input_ids"][i].clone()).unwrap();
        let qwant: Vec<i64> = qwant
            .into_iter()
            .zip(&qmask)
            .filter(|(_, m)| **m == 1)
            .map(|(x, _)| x)
            .collect();
        assert_eq!(ins, vec![qwant], "prompt {i}: qformer_input_ids");
    }
    let m = &meta["image_text"];
    let (ok, out) = {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"))
            .args([
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                m["prompts"][0].as_str().unwrap(),
                "--image",
                fixture("images").join("astronaut_32.png").to_str().unwrap(),
                "--raw",
                "--max-new-tokens",
                "6",
                "--json",
            ])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    assert!(ok, "{out}");
    let got: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(got["input_ids"], m["input_ids"][0]);
    assert_eq!(got["output_ids"], m["greedy_ids"]);
    for (a, b) in got["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(m["greedy_logprobs"].as_array().unwrap())
    {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-4);
    }
}

/// Training an InstructBLIP directory: each image's Q-Former instruction is the text of the turn holding its marker
/// (through the Q-Former's tokenizer); a LoRA instruct stage on the tiny shapes world runs, a killed run resumes to
/// the same losses, and the stage's model is an InstructBLIP directory again (with its Q-Former tokenizer).
#[test]
fn instructblip_fine_tunes_with_instructions_and_resumes() {
    use mitune::data::sources::{Role, Sample};
    let dir = fixture("instructblip");
    let spec = llava_spec(&dir).unwrap();
    let text = mitune::data::tokenizer::TextProcessor::load(
        &dir,
        spec.image_token_id,
        spec.image_tokens(),
    )
    .unwrap();
    let sample = Sample {
        id: "s".into(),
        origin: "s".into(),
        source: 0,
        images: vec![fixture("images").join("astronaut_32.png")],
        videos: vec![],
        messages: vec![
            (Role::User, "<image>\nWhat is in the image?".into()),
            (Role::Assistant, "An astronaut.".into()),
        ],
        raw_text: None,
        meta: serde_json::Value::Null,
    };
    let src =
        mitune::data::templates::source(mitune::recipe::schema::Template::VicunaV1, &text).unwrap();
    let e = mitune::data::templates::encode(&text, &src, &sample, 0, 256).unwrap();
    assert_eq!(
        e.instructions,
        vec![text.qformer_ids("What is in the image?").unwrap()]
    );
    assert_eq!(
        e.ids.iter().filter(|&&t| t == spec.image_token_id).count(),
        4
    );

    let d = common::scratch("instructblip-train");
    let w = common::world(&d);
    let recipe = |out: &str| {
        format!(
            r#"name = "ib"
seed = 2
pipeline = ["instruct"]
output = {out:?}
[model]
from = {dir:?}
[stages.instruct]
kind = "instruct"
data = {{ sources = [{{ kind = "llava_json", path = {inst:?} }}] }}
template = "vicuna_v1"
batch = {{ global = 4, micro = 2 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
adapter = {{ kind = "lora", rank = 4, alpha = 8, targets = ["q_proj", "v_proj"] }}
max_steps = 4
max_len = 256
log_every = 1
save_every = 2
"#,
            out = d.join(out).display().to_string(),
            dir = dir.display().to_string(),
            inst = w.join("instruct_train.json").display().to_string(),
        )
    };
    let (a, b) = (d.join("a.toml"), d.join("b.toml"));
    std::fs::write(&a, recipe("runs-a")).unwrap();
    std::fs::write(&b, recipe("runs-b")).unwrap();
    let (ok, err) = common::run_mitune(&["train", a.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let (ok, _) = common::run_mitune(
        &["train", b.to_str().unwrap()],
        Some(("MITUNE_FAULT_ABORT_AT_STEP", "instruct:3")),
    );
    assert!(!ok);
    let (ok, err) = common::run_mitune(&["train", b.to_str().unwrap(), "--resume"], None);
    assert!(ok, "{err}");
    let (la, lb) = (
        common::losses(&d.join("runs-a/ib")),
        common::losses(&d.join("runs-b/ib")),
    );
    assert_eq!(la.len(), 4);
    assert_eq!(la, lb, "resumed losses differ");
    let model = d.join("runs-a/ib/instruct/model");
    assert!(is_instructblip(&llava_spec(&model).unwrap()));
    assert!(model.join("qformer_tokenizer/tokenizer.json").exists());
    load_llava(&model, &Device::flex()).unwrap();
}
