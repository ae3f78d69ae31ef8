//! Evaluation without a model: the public layouts load (POPE JSON lines in a `.json` file, ScienceQA's keyed
//! `problems.json`, VQAv2-style answer lists, LLaVA conversations), bad samples are named, and the scoring of
//! given outputs gives hand-computed metrics; prompts carry options, demonstrations' answers and CoT extraction.
use mitune::eval::data::{self, TaskKind};
use mitune::eval::run::{self, Split, TaskSpec};
use std::path::{Path, PathBuf};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mitune-eval-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn png(p: &Path) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(4, 4, image::Rgb([200, 0, 0]))
        .save(p)
        .unwrap();
}

fn spec(task: TaskKind, data: &Path) -> TaskSpec {
    TaskSpec {
        name: None,
        task,
        data: data.to_path_buf(),
        images: None,
        split: Split::HeldOut,
        hint: None,
        shots: 0,
        demos: None,
        cot: false,
        limit: None,
    }
}

fn shared(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/formats")
        .join(name)
}

#[test]
fn pope_layout_loads_and_scores() {
    let d = scratch("pope");
    // POPE ships JSON lines under a .json name, bare image file names
    std::fs::copy(shared("pope_random.sample.json"), d.join("pope.json")).unwrap();
    let (items, bad) = data::load(TaskKind::Pope, &d.join("pope.json"), None).unwrap();
    assert!(items.is_empty() && !bad.is_empty());
    assert!(bad[0].reason.contains("does not exist"), "{:?}", bad[0]);
    png(&d.join("toy_val_0029.png"));
    let (items, bad) = data::load(TaskKind::Pope, &d.join("pope.json"), None).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(items.len(), 4);
    assert_eq!(items[0].id, "1");
    assert_eq!(items[1].label, Some(false));
    // yes, no, yes, no labelled; the model says yes, yes ("not" makes a no), no, no
    let outputs = [
        "Yes, there is.",
        "Yes. It is not a kite though.",
        "No, there is not.",
        "no",
    ]
    .map(String::from);
    let r = run::score(
        &spec(TaskKind::Pope, &d.join("pope.json")),
        &items,
        &outputs,
    );
    // predictions: yes, yes, no, no vs labels yes, no, yes, no -> TP 1, FP 1, FN 1, TN 1
    assert_eq!(r.metrics["accuracy"], 0.5);
    assert_eq!(r.metrics["precision"], 0.5);
    assert_eq!(r.metrics["recall"], 0.5);
    assert_eq!(r.metrics["f1"], 0.5);
    assert_eq!(r.metrics["yes_ratio"], 0.5);
}

#[test]
fn scienceqa_problems_load_with_context_and_per_category_accuracy() {
    let d = scratch("sqa");
    std::fs::copy(
        shared("scienceqa_problems.sample.json"),
        d.join("problems.json"),
    )
    .unwrap();
    png(&d.join("images/1/image.png"));
    let (items, bad) = data::load(
        TaskKind::Mc,
        &d.join("problems.json"),
        Some(&d.join("images")),
    )
    .unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(items.len(), 2);
    let one = items.iter().find(|i| i.id == "1").unwrap();
    assert_eq!(one.images, vec![d.join("images/1/image.png")]);
    assert_eq!(one.answer, Some(2));
    let two = items.iter().find(|i| i.id == "2").unwrap();
    assert!(two.images.is_empty());
    let prompt = run::user_text(TaskKind::Mc, two, run::default_hint(TaskKind::Mc), false);
    assert_eq!(
        prompt,
        "Context: A rectangle is a shape with four straight sides and four right angles.\n\
         Is a square a kind of rectangle?\nA. yes\nB. no\n\
         Answer with the option's letter from the given choices directly."
    );
    let p1 = run::user_text(TaskKind::Mc, one, "", false);
    assert!(p1.starts_with("<image>\nWhich shape"), "{p1}");
    let spec = spec(TaskKind::Mc, &d.join("problems.json"));
    let order: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let outputs: Vec<String> = order
        .iter()
        .map(|id| if *id == "1" { "C" } else { "The answer is B." }.to_string())
        .collect();
    let r = run::score(&spec, &items, &outputs);
    assert_eq!(r.metrics["accuracy"], 0.5);
    assert_eq!(r.metrics["invalid"], 0.0);
    assert_eq!(r.categories["Counting corners"].accuracy, 1.0);
    assert_eq!(r.categories["Classify shapes"].accuracy, 0.0);
    // option text is accepted as an answer too
    let outputs: Vec<String> = order
        .iter()
        .map(|id| if *id == "1" { "square" } else { "yes" }.to_string())
        .collect();
    assert_eq!(run::score(&spec, &items, &outputs).metrics["accuracy"], 1.0);
}

#[test]
fn vqa_answers_lists_and_llava_conversations() {
    let d = scratch("vqa");
    png(&d.join("a.png"));
    std::fs::write(
        d.join("vqa.jsonl"),
        [
            r#"{"question_id": 7, "image": "a.png", "question": "How many?", "answers": ["two", "2", "two", "3", "two"]}"#,
            r#"{"question_id": 8, "image": "a.png", "question": "Colour?", "answers": [{"answer": "red"}, {"answer": "Red"}, {"answer": "dark red"}]}"#,
            r#"{"id": "c", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nShape?"}, {"from": "gpt", "value": "A circle."}]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let (items, bad) = data::load(TaskKind::Vqa, &d.join("vqa.jsonl"), None).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(items[1].refs, vec!["red", "Red", "dark red"]);
    assert_eq!(items[2].question, "<image>\nShape?");
    let outputs = ["Two", "red.", "circle"].map(String::from);
    let r = run::score(&spec(TaskKind::Vqa, &d.join("vqa.jsonl")), &items, &outputs);
    // "two" normalises to "2": 4 of 5 references match -> min(4/3, 1) = 1; "red": 2 match -> 2/3;
    // one reference "A circle." -> exact match after normalisation = 1
    let want = (1.0 + 2.0 / 3.0 + 1.0) / 3.0;
    assert!(
        (r.metrics["accuracy"] - want).abs() < 1e-9,
        "{:?}",
        r.metrics
    );
}

#[test]
fn bad_samples_are_named_and_skippable() {
    let d = scratch("bad");
    png(&d.join("a.png"));
    std::fs::write(
        d.join("mc.jsonl"),
        [
            r#"{"id": "ok", "image": "a.png", "question": "Q?", "choices": ["x", "y"], "answer": "B"}"#,
            r#"{"id": "letter", "image": "a.png", "question": "Q?", "choices": ["x", "y"], "answer": "D"}"#,
            r#"{"id": "index", "image": "a.png", "question": "Q?", "choices": ["x", "y"], "answer": 5}"#,
            r#"{"id": "noimage", "image": "missing.png", "question": "Q?", "choices": ["x", "y"], "answer": 0}"#,
            r#"{"id": "unanswered", "image": "a.png", "question": "Q?", "choices": ["x", "y"]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let (items, bad) = data::load(TaskKind::Mc, &d.join("mc.jsonl"), None).unwrap();
    let reasons: Vec<(String, String)> = bad.into_iter().map(|b| (b.id, b.reason)).collect();
    assert_eq!(items.len(), 2, "ok and unanswered load: {reasons:?}");
    assert!(
        reasons[0].0 == "letter" && reasons[0].1.contains("letter A-B"),
        "{reasons:?}"
    );
    assert!(reasons[1].0 == "index" && reasons[1].1.contains("outside the 2 choices"));
    assert!(reasons[2].0 == "noimage" && reasons[2].1.contains("missing.png"));
    let unanswered = items.iter().find(|i| i.id == "unanswered").unwrap();
    assert!(
        data::unscored(TaskKind::Mc, unanswered)
            .unwrap()
            .contains("answer")
    );
    // the CLI reports the first bad sample with its id and the way out
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"))
        .args(["eval", "--model"])
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava_clip_llama"))
        .args(["--task", "mc", "--template", "vicuna_v1", "--data"])
        .arg(d.join("mc.jsonl"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("sample letter")
            && err.contains("4 bad sample(s)")
            && err.contains("--skip-bad"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mitune"))
        .args(["eval", "--model"])
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava_clip_llama"))
        .args([
            "--task",
            "mc",
            "--template",
            "vicuna_v1",
            "--skip-bad",
            "--json",
            "--max-new-tokens",
            "2",
            "--data",
        ])
        .arg(d.join("mc.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["n"], 1);
    assert_eq!(r["skipped"].as_array().unwrap().len(), 4);
}

#[test]
fn cot_answers_and_demonstrations() {
    assert_eq!(
        run::final_answer("There are two red shapes.\nSo the answer is two.", true),
        "two"
    );
    assert_eq!(run::final_answer("reasoning...\nAnswer: B", true), "B");
    assert_eq!(run::final_answer("circle\nmore text", false), "circle");
    let it = data::Item {
        refs: vec!["two".into()],
        choices: vec!["x".into(), "y".into()],
        answer: Some(1),
        label: Some(false),
        ..Default::default()
    };
    assert_eq!(it.demo_answer(TaskKind::Vqa), "two");
    assert_eq!(it.demo_answer(TaskKind::Mc), "B");
    assert_eq!(it.demo_answer(TaskKind::Pope), "no");
    let q = run::user_text(
        TaskKind::Vqa,
        &data::Item {
            question: "How many?".into(),
            ..it
        },
        "",
        true,
    );
    assert!(q.ends_with(run::COT_PROMPT), "{q}");
}
