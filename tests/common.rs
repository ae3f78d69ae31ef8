//! Shared helpers for the parity tests: fixture paths, expected tensors/JSON, comparisons.
#![allow(dead_code)]
use mitune::checkpoint::safetensors_io::WeightStore;
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
