//! Qwen2-VL / Qwen2.5-VL video against transformers' `Qwen2VLVideoProcessor`, `Qwen2VLProcessor` and the models
//! (tools/make_qwen2_vl_fixture.py video [--v25]: a 6-frame pan of a photo, tests/fixtures/video/pan/, sized by the
//! video processor's own 256..2048-pixel budget): `sample_frames` indices, the clip's grid, pixel values, input_ids
//! with `<|video_pad|>` runs, `get_rope_index` positions (Qwen2.5-VL's `second_per_grid_ts` time alignment at 2 and
//! 1.5 fps), logits for a clip and an image + clip, greedy ids and log-probs, the masked loss and gradients, the
//! `generate --video` CLI; then a LoRA fine-tune on LLaVA-Video and ShareGPT records with clips, and bad clips.
mod common;

use burn::tensor::{Device, Tensor};
use common::{Expected, expected, expected_file, fixture, image, max_abs_diff};
use mitune::checkpoint::hf::llava_spec;
use mitune::checkpoint::load_llava;
use mitune::data::video::ClipSource;
use mitune::generate::{GenConfig, generate};
use mitune::zoo::layers::{float_tensor, to_vec};
use mitune::zoo::mllm::MmInput;
use mitune::zoo::native::VideoRes;
use std::path::PathBuf;

fn clip_dir() -> PathBuf {
    fixture("video").join("pan")
}

fn v<T: serde::de::DeserializeOwned>(x: &serde_json::Value) -> T {
    serde_json::from_value(x.clone()).unwrap()
}

/// The fixture's clip patches [96, 3·2·8·8] (bf16) -> [96, 6, 8, 8] (channel c·2 + frame, as HF flattens).
fn clip_pixels(pe: &Expected, device: &Device) -> Tensor<4> {
    let (s, v) = pe.tensor("pixel_values_videos");
    float_tensor(v, [s[0], 6, 8, 8], device)
}

/// The photo of the image cases: Qwen2-VL's `image_text` pixel values.
fn photo_pixels(device: &Device) -> Tensor<4> {
    common::qwen_still_patches(&expected("qwen2_vl"), "image_text.pixel_values", device)
}

fn seconds(e: &Expected, case: &str) -> Vec<f64> {
    match e.meta[case].get("second_per_grid_ts") {
        Some(s) => v(s),
        // Qwen2-VL's processor gives none: temporal patch / fps, which its positions do not read
        None => vec![2.0 / e.meta[case]["fps"].as_f64().unwrap()],
    }
}

fn case_input(e: &Expected, pe: &Expected, case: &str, device: &Device) -> MmInput {
    let m = &e.meta[case];
    let ids: Vec<i64> = v(&m["input_ids"]);
    let images: Vec<String> = v(&m["images"]);
    let input = if images.is_empty() {
        MmInput::single(ids, None)
    } else {
        MmInput::single(ids, Some(photo_pixels(device))).with_sizes(vec![[50, 75]])
    };
    input.with_videos(
        Some(clip_pixels(pe, device)),
        v(&m["video_grid_thw"]),
        seconds(e, case),
    )
}

#[test]
fn qwen2_vl_video_matches_transformers() {
    video_parity("qwen2_vl", &["video", "image_video"]);
}

#[test]
fn qwen2_5_vl_video_matches_transformers() {
    video_parity("qwen2_5_vl", &["video", "image_video", "video_slow"]);
}

fn video_parity(name: &str, cases: &[&str]) {
    let device = Device::flex();
    let dir = fixture(name);
    let e = expected_file(name, "video");
    let pe = expected_file("qwen2_vl", "video");
    let spec = llava_spec(&dir).unwrap();
    let n = spec.native.clone().unwrap();
    // the video processor's own budget and rate, read from video_preprocessor_config.json
    assert_eq!((n.video.min_pixels, n.video.max_pixels), (256, 2048));
    assert_eq!(
        (n.video.fps, n.video.min_frames, n.video.max_frames),
        (2.0, 4, 768)
    );
    // transformers' sample_frames for clips of several lengths and rates
    for s in e.meta["sampling"].as_array().unwrap() {
        let r = VideoRes {
            fps: s["fps"].as_f64().unwrap(),
            max_frames: s["max_frames"].as_u64().unwrap() as usize,
            ..n.video.clone()
        };
        let got = r
            .sample(
                s["total"].as_u64().unwrap() as usize,
                s["frame_rate"].as_f64().unwrap(),
                2,
            )
            .unwrap();
        assert_eq!(got.indices, v::<Vec<usize>>(&s["indices"]), "sampling {s}");
    }
    // the clip directory: six frames in order, grid [3, 4, 8], 1 s per temporal patch at 2 fps
    let clip = ClipSource::Dir(clip_dir()).open(&n).unwrap();
    let frames: Vec<String> = v(&e.meta["clip"]);
    assert_eq!(
        clip.frames,
        frames
            .iter()
            .map(|f| clip_dir().join(f))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        clip.grid,
        v::<Vec<[usize; 3]>>(&e.meta["video"]["video_grid_thw"])[0]
    );
    assert_eq!(clip.seconds_per_grid, 1.0);

    let model = load_llava(&dir, &device).unwrap();
    for &case in cases {
        let input = case_input(&e, &pe, case, &device);
        let want: Vec<Vec<i64>> = v(&e.meta[case]["position_ids"]);
        let (got, deltas) = model.mrope_positions(&input).unwrap().unwrap();
        for a in 0..3 {
            assert_eq!(got[a], want[a], "{name} {case}: positions axis {a}");
        }
        assert_eq!(
            deltas,
            v::<Vec<i64>>(&e.meta[case]["rope_deltas"]),
            "{name} {case}: deltas"
        );
        let logits = to_vec(model.forward(&input).unwrap());
        let (shape, want) = e.tensor(&format!("{case}.logits"));
        let cols: Vec<usize> = v(&e.meta[case]["logit_columns"]);
        let err = common::column_logit_err(&logits, &want, &input.attention, &cols, shape[2]);
        eprintln!("{name} {case}: max |Δlogit| {err:.2e}");
        assert!(err <= 1e-4, "{name} {case}: logits differ by {err}");
    }
    // greedy generation on the clip
    let g = &e.meta["greedy"];
    let cfg = GenConfig::greedy(8, model.spec.llm.eos_token_ids.clone());
    let out = generate(&model, case_input(&e, &pe, "video", &device), &cfg, |_| {}).unwrap();
    assert_eq!(
        out.output_ids,
        v::<Vec<i64>>(&g["output_ids"]),
        "{name}: greedy ids"
    );
    let lp: Vec<f64> = v(&g["logprobs"]);
    for (a, b) in out.logprobs.iter().zip(&lp) {
        assert!(
            (a - b).abs() <= 1e-4,
            "{name}: log-probs {:?} vs {lp:?}",
            out.logprobs
        );
    }

    // the processor side: our frames -> patches within 0.05 of Qwen2VLVideoProcessor (torchvision's bicubic)
    let mut text = mitune::data::tokenizer::TextProcessor::load(
        &dir,
        spec.image_token_id,
        spec.image_tokens(),
    )
    .unwrap();
    text.configure(&spec);
    let mut images = mitune::data::images::ImageProcessor::load(&dir).unwrap();
    images.configure(&spec);
    let (px, grid) = images.video_patches(&clip.decode().unwrap()).unwrap();
    assert_eq!(grid, clip.grid);
    let err = max_abs_diff(&px, &pe.tensor("pixel_values_videos").1);
    eprintln!("{name}: clip pixels max |Δ| {err:.3}");
    assert!(err < 0.05, "clip pixel values differ by {err}");
    // input_ids: the chat template renders `<video>` as the typed video part; each run sized by the grid
    let tokens = n.grid_tokens(clip.grid);
    let chat = &e.meta["chat"];
    let user = chat["user"].as_str().unwrap();
    let rendered = text
        .render_chat(&[("user".into(), user.into())], true)
        .unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
    let ids = text.encode_chat_media(user, &[], &[tokens]).unwrap();
    assert_eq!(ids, v::<Vec<i64>>(&e.meta["video"]["input_ids"]));
    let ids = text
        .encode_media(
            e.meta["image_video"]["prompt"].as_str().unwrap(),
            false,
            &[[50, 75]],
            &[tokens],
        )
        .unwrap();
    assert_eq!(ids, v::<Vec<i64>>(&e.meta["image_video"]["input_ids"]));

    // `mitune generate --video DIR --json`: transformers' prompt ids and greedy ids
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        dir.display().to_string(),
        "--prompt".into(),
        user.into(),
        "--video".into(),
        clip_dir().display().to_string(),
        "--max-new-tokens".into(),
        "8".into(),
    ];
    let got = common::cli_json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        got["input_ids"], e.meta["video"]["input_ids"],
        "CLI prompt ids"
    );
    assert_eq!(got["output_ids"], g["output_ids"], "CLI greedy ids");
    // a clip marker without its clip is a clear error, nothing computed
    args.truncate(5);
    let (ok, err) = common::run_mitune(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
    assert!(
        !ok && err.contains("1 `<video>` marker(s) but 0 --video"),
        "{err}"
    );
}

/// transformers: `model(..., pixel_values_videos, labels).loss` with the prompt masked; the merger's and the patch
/// embedding's gradients (the temporal frames of the Conv3d) within 1e-3 relative.
#[test]
fn qwen2_vl_video_loss_and_gradients_match_transformers() {
    for name in ["qwen2_vl", "qwen2_5_vl"] {
        let device = Device::flex().autodiff();
        let e = expected_file(name, "video");
        let pe = expected_file("qwen2_vl", "video");
        let model = load_llava(&fixture(name), &device).unwrap();
        let m = &e.meta["loss"];
        let labels: Vec<i64> = v(&m["labels"]);
        let input = MmInput::single(v(&m["input_ids"]), None).with_videos(
            Some(clip_pixels(&pe, &device)),
            v(&e.meta["video"]["video_grid_thw"]),
            seconds(&e, "video"),
        );
        let (got, g1, g2) =
            common::qwen_loss_and_grads(&model, model.forward(&input).unwrap(), &labels, &e, 8);
        let want = m["loss"].as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-4, "{name}: loss {got} vs {want}");
        eprintln!(
            "{name} video: loss {got} vs {want}; grad rel err merger fc1 {g1:.2e}, patch_embed {g2:.2e}"
        );
        assert!(
            g1 < 1e-3 && g2 < 1e-3,
            "{name}: gradients differ: {g1}, {g2}"
        );
    }
}

/// A LoRA fine-tune on clips: LLaVA-Video records (`video` = a frame directory, `<image>` marking it) and ShareGPT
/// records (`videos`, `<video>`) mixed with image records, a stage's `fps` / `max_frames`; `validate --data` counts
/// the clips' tokens; the saved directory carries the stage's clip settings; bad clips are located errors.
#[test]
fn qwen2_vl_fine_tunes_on_clips() {
    let dir = fixture("qwen2_vl");
    let d = common::scratch("qwen2-vl-video");
    let clip = clip_dir().display().to_string();
    let frames: Vec<String> = (1..=6)
        .map(|i| {
            clip_dir()
                .join(format!("frame_{i}.png"))
                .display()
                .to_string()
        })
        .collect();
    let records: Vec<serde_json::Value> = (0..8)
        .map(|i| match i % 3 {
            0 => serde_json::json!({"id": format!("v{i}"), "video": clip,
                "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                                  {"from": "gpt", "value": format!("The view pans right {i}.")}]}),
            1 => serde_json::json!({"id": format!("f{i}"), "video": frames,
                "conversations": [{"from": "human", "value": "<video>\nWhich way does it move?"},
                                  {"from": "gpt", "value": "Right."}]}),
            _ => serde_json::json!({"id": format!("i{i}"), "image": image("chelsea_75x50.png").display().to_string(),
                "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                  {"from": "gpt", "value": "A cat."}]}),
        })
        .collect();
    let data = d.join("clips.json");
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let base = common::lora_recipe("qc", &d.join("runs"), &dir, &data, "tokenizer", 256);
    let with = |extra: &str| base.replace("}] }", &format!("}}], {extra} }}"));
    let r = d.join("r.toml");
    // 4 frames of 6 (max_frames = 4): 2 temporal patches of 4×8 patches -> 16 tokens per clip
    std::fs::write(&r, with("max_frames = 4")).unwrap();
    let (text, _) = common::validate_data(&r);
    assert!(
        text.contains("video tokens per sample with clips (6): min 16, median 16, max 16"),
        "{text}"
    );
    let (ok, err) = common::run_mitune(&["train", r.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let saved = d.join("runs/qc/lora/model");
    assert_eq!(
        llava_spec(&saved).unwrap().native.unwrap().video.max_frames,
        4
    );
    load_llava(&saved, &Device::flex()).unwrap();

    // bad clips: an empty directory, a video file, and a stage setting out of range
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mp4 = d.join("clip.mp4");
    std::fs::write(&mp4, b"not decoded").unwrap();
    for (bad, want) in [(&empty, "has no frames"), (&mp4, "is a video file")] {
        let mut recs = records.clone();
        recs[0]["video"] = bad.display().to_string().into();
        std::fs::write(&data, serde_json::to_string(&recs).unwrap()).unwrap();
        let (ok, err) = common::run_mitune(&["validate", r.to_str().unwrap(), "--data"], None);
        assert!(
            !ok && err.contains(want) && err.contains("v0"),
            "{want}: {err}"
        );
    }
    std::fs::write(&r, with("max_frames = 0")).unwrap();
    let (ok, err) = common::run_mitune(&["validate", r.to_str().unwrap()], None);
    assert!(!ok && err.contains("stages.lora.data.max_frames"), "{err}");
}

/// `mitune chat --video DIR` answers as `generate` does for the same user turn; `/video` of an empty directory is
/// reported and the conversation goes on.
#[test]
fn qwen2_vl_chat_with_a_clip() {
    use std::io::Write;
    let dir = fixture("qwen2_vl");
    let d = common::scratch("qwen2-vl-chat-video");
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let clip = clip_dir().display().to_string();
    let want = common::cli_json(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "<video>\nWhat happens?",
        "--video",
        &clip,
        "--max-new-tokens",
        "6",
        "--temperature",
        "1.5",
        "--seed",
        "7",
    ]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"))
        .args(["chat", "--model", dir.to_str().unwrap(), "--video", &clip])
        .args([
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.5",
            "--seed",
            "7",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    write!(
        child.stdin.take().unwrap(),
        "/video {}\nWhat happens?\n",
        empty.display()
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("has no frames"), "{stderr}");
    // sampled (the random model's greedy answer is blank lines): the same seed draws the same tokens
    let text = want["text"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "{want}");
    assert_eq!(
        stdout.trim_end_matches('\n'),
        text.trim_end_matches('\n'),
        "{stderr}"
    );
}
