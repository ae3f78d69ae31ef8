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
