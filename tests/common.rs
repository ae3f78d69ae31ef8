//! Shared helpers for the parity tests: fixture paths, expected tensors/JSON, comparisons.
#![allow(dead_code)]
use burn::tensor::{Device, Tensor};
use mitune::checkpoint::safetensors_io::WeightStore;
use mitune::zoo::layers::{float_tensor, to_vec};
use mitune::zoo::mllm::{Llava, MmInput};
use std::path::PathBuf;

pub const MODELS: [&str; 2] = ["llava_clip_llama", "llava_siglip_qwen2"];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn image(name: &str) -> PathBuf {
    fixture("images").join(name)
}

pub struct Expected {
    pub store: WeightStore,
    pub meta: serde_json::Value,
}

pub fn expected(name: &str) -> Expected {
    let d = fixture(name);
    let store = WeightStore::open_files(&[d.join("expected.safetensors")]).unwrap();
    let meta =
        serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap();
    Expected { store, meta }
}

impl Expected {
    pub fn tensor(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let l = self.store.get(key).unwrap();
        (l.shape, l.values)
    }
    pub fn ids(&self, case: &str) -> Vec<i64> {
        self.meta[case]["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect()
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// An expected [n, c, h, w] pixel tensor (transformers' processor output) on `device`.
pub fn pixels(e: &Expected, key: &str, device: &Device) -> Tensor<4> {
    let (s, v) = e.tensor(key);
    float_tensor(v, [s[0], s[1], s[2], s[3]], device)
}

/// Max |Δlogit| of `model` vs transformers on the fixture's image+text prompt.
pub fn image_text_logit_error(model: &Llava, e: &Expected, device: &Device) -> f32 {
    let px = pixels(e, "image_text.pixel_values", device);
    let got = to_vec(
        model
            .forward(&MmInput::single(e.ids("image_text"), Some(px)))
            .unwrap(),
    );
    max_abs_diff(&got, &e.tensor("image_text.logits").1)
}
