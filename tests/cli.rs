//! The `mitune` binary as a user runs it: generate --json against transformers, export round-trip, and bad input
//! (each a one-line error, exit code != 0, no panic).
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn mitune(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mitune"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mitune-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// Asserts a clean user-facing failure: non-zero exit, one line on stderr containing `needle`, no panic.
fn fails_cleanly(args: &[&str], needle: &str) {
    let (ok, _, err) = mitune(args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
}

#[test]
fn generate_json_matches_transformers() {
    for name in MODELS {
        let dir = fixture(name);
        let e = expected(name);
        let g = &e.meta["greedy"];
        let img = image("astronaut_32.png");
        let (ok, out, err) = mitune(&[
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
            "--json",
        ]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(
            v["input_ids"], e.meta["image_text"]["input_ids"],
            "{name}: input ids after image expansion"
        );
        assert_eq!(v["output_ids"], g["output_ids"], "{name}: greedy ids");
        for (a, b) in v["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(g["logprobs"].as_array().unwrap())
        {
            let d = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
            assert!(d < 1e-4, "{name}: logprob {a} vs {b}");
        }
        assert!(v["text"].is_string());
    }
}

/// mitune-saved checkpoint: reloads in mitune with the same logits; the committed transformers check
/// (tools/make_fixtures.py roundtrip) loaded the same export with LlavaForConditionalGeneration.
#[test]
fn export_round_trip() {
    use burn::tensor::Device;
    let out = scratch("export");
    let src = fixture("llava_clip_llama");
    let (ok, _, err) = mitune(&[
        "export",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let device = Device::flex();
    let model = mitune::checkpoint::load_llava(&out, &device).unwrap();
    let err = image_text_logit_error(&model, &expected("llava_clip_llama"), &device);
    assert!(err < 1e-4, "reloaded export: max |Δlogit| = {err}");
    assert!(out.join("tokenizer.json").exists() && out.join("chat_template.jinja").exists());
    let check: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("roundtrip_check.json")).unwrap())
            .unwrap();
    assert_eq!(
        check["ok"], true,
        "transformers could not reload a mitune export: {check}"
    );
    assert!(check["max_abs_logit_diff"].as_f64().unwrap() < 1e-4);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_input_gives_one_line_errors() {
    let good = fixture("llava_clip_llama");
    let img = image("astronaut_32.png");
    let (g, i) = (good.to_str().unwrap(), img.to_str().unwrap());
    // wrong paths
    fails_cleanly(
        &["generate", "--model", "/no/such/model", "--prompt", "hi"],
        "/no/such/model",
    );
    fails_cleanly(
        &[
            "generate",
            "--model",
            g,
            "--prompt",
            "<image> hi",
            "--image",
            "/no/such.png",
        ],
        "/no/such.png",
    );
    // two markers, one image
    fails_cleanly(
        &[
            "generate",
            "--model",
            g,
            "--prompt",
            "<image> and <image>",
            "--image",
            i,
        ],
        "2 `<image>` marker(s) but 1",
    );
    // truncated safetensors
    let d = scratch("truncated");
    copy_dir(&good, &d);
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    fails_cleanly(
        &["inspect", d.to_str().unwrap()],
        "model.safetensors: not a valid safetensors file",
    );
    // config errors: unknown activation, unsupported model_type, a shape the weights contradict
    let edited = |tag: &str, from: &str, to: &str, needle: &str| {
        let d = scratch(tag);
        copy_dir(&good, &d);
        let c = d.join("config.json");
        let text = std::fs::read_to_string(&c).unwrap();
        assert!(text.contains(from), "fixture config lacks {from}");
        std::fs::write(&c, text.replace(from, to)).unwrap();
        fails_cleanly(&["inspect", d.to_str().unwrap()], needle);
    };
    edited(
        "act",
        "\"silu\"",
        "\"swiglu_v9\"",
        "text_config.hidden_act`: unsupported activation `swiglu_v9`",
    );
    edited(
        "mt",
        "\"model_type\": \"llama\"",
        "\"model_type\": \"gpt_neox\"",
        "unsupported LLM model_type `gpt_neox`",
    );
    edited(
        "shape",
        "\"intermediate_size\": 128",
        "\"intermediate_size\": 96",
        "shape mismatch",
    );
    for tag in ["truncated", "act", "mt", "shape"] {
        let _ = std::fs::remove_dir_all(scratch(tag));
    }
}

/// `chat` on a checkpoint without a chat template says which template to pass, and works with one named.
#[test]
fn chat_without_a_template_names_the_fix() {
    let d = std::env::temp_dir().join(format!("mitune-cli-chat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in std::fs::read_dir(fixture("llava_clip_llama")).unwrap() {
        let f = f.unwrap().path();
        if f.file_name().unwrap() != "chat_template.jinja" {
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
    }
    let dir = d.to_str().unwrap();
    fails_cleanly(&["chat", "--model", dir], "--template vicuna_v1");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"))
        .args([
            "chat",
            "--model",
            dir,
            "--template",
            "vicuna_v1",
            "--max-new-tokens",
            "3",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "Hello there!").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
}

/// `mitune bench` runs its tiny presets end to end and prints the fields `tools/bench_*.py` print (what the
/// figures are is never asserted: timing belongs to benchmarks); an unknown preset is a clean error.
#[test]
fn bench_runs_the_tiny_presets() {
    for (what, field) in [
        ("train", "tokens_per_s"),
        ("generate", "generated_tokens_per_s"),
    ] {
        let (ok, out, err) = mitune(&["bench", what, "--preset", "tiny", "--json", "--steps", "1"]);
        assert!(ok, "{err}");
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(!lines.is_empty(), "{out}");
        for v in &lines {
            assert_eq!(v["framework"], "mitune");
            assert_eq!(v["preset"], "tiny");
            assert!(v[field].as_f64().is_some_and(|x| x > 0.0), "{v}");
            assert!(v["cpu"].is_string(), "{v}");
        }
    }
    fails_cleanly(&["bench", "train", "--preset", "7b"], "choose one of");
}

/// A `MITUNE_DEVICE` this build cannot serve stops every command with one line saying why, instead of running on
/// the CPU unnoticed.
#[test]
fn an_unservable_device_is_refused() {
    for (value, needle) in [
        ("gpu", "MITUNE_DEVICE=gpu: expected flex, wgpu"),
        ("cuda:local", "this build has no `cuda` backend"),
        ("wgpu:first", "`first` is not a device number"),
    ] {
        if value.starts_with("wgpu") && !cfg!(feature = "wgpu") {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_mitune"))
            .args(["validate", "recipes/quickstart.toml"])
            .env("MITUNE_DEVICE", value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: accepted");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        assert!(err.contains(needle), "{value}: {err}");
    }
}
