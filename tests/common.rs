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

/// A fresh scratch directory for one test (`tag` keeps parallel tests apart).
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mitune-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny shapes world (48 training images) under `dir/shapes`.
pub fn world(dir: &std::path::Path) -> PathBuf {
    let w = dir.join("shapes");
    let cfg = mitune::data::shapes::ShapesConfig {
        seed: 1,
        train: 48,
        heldout: 6,
        vocab_size: 320,
    };
    mitune::data::shapes::ensure(&w, &cfg).unwrap();
    w
}

/// Runs the mitune binary; (success, stderr).
pub fn run_mitune(args: &[&str], env: Option<(&str, &str)>) -> (bool, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"));
    c.args(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// (stage, step) -> loss as written in a run's metrics.jsonl (the last line wins: a resumed step overwrites the
/// killed run's).
pub fn losses(run: &std::path::Path) -> Vec<((String, u64), String)> {
    let mut m = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let (Some(s), Some(k), Some(l)) =
            (v["stage"].as_str(), v["step"].as_u64(), v.get("loss"))
        {
            m.insert((s.to_string(), k), l.to_string());
        }
    }
    m.into_iter().collect()
}
