//! The data contract (issue 16) on a nasty dataset: one `validate --data` run names every bad sample (file, line,
//! id, kind, reason), grouped, and lists them all as JSONL; every valid sample — grey, RGBA, 16-bit PNG, CMYK and
//! EXIF-rotated JPEG, a 3000×2000 and a 1-pixel image — is accepted; `train` with `skip` finishes and lists them,
//! with `fail` stops before step 1; a file that breaks after the checks follows the policy mid-run.
mod common;

use common::{fixture, image, run_mitune, scratch};
use std::io::Write;
use std::path::Path;

fn rec(id: &str, img: &str, q: &str, a: &str) -> String {
    serde_json::json!({"id": id, "image": img,
        "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    .to_string()
}

/// Writes the images and the JSONL; returns (valid ids, bad ids with their kind).
fn nasty(d: &Path) -> (Vec<&'static str>, Vec<(&'static str, &'static str)>) {
    let imgs = d.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let save = |name: &str, im: image::DynamicImage| im.save(imgs.join(name)).unwrap();
    save(
        "grey.png",
        image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(20, 10, image::Luma([90]))),
    );
    save(
        "rgba.png",
        image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            10,
            20,
            image::Rgba([200, 10, 10, 128]),
        )),
    );
    save(
        "deep.png",
        image::DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
            16,
            16,
            image::Rgb([60000u16, 100, 30000]),
        )),
    );
    save(
        "huge.png",
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            3000,
            2000,
            image::Rgb([1, 2, 3]),
        )),
    );
    save(
        "dot.png",
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            1,
            1,
            image::Rgb([255, 255, 0]),
        )),
    );
    for f in ["cmyk_12x8.jpg", "exif_rotated_12x8.jpg", "astronaut_32.png"] {
        std::fs::copy(image(f), imgs.join(f)).unwrap();
    }
    // a PNG cut in half (its header reads, its pixels do not), a text file named .png
    let whole = std::fs::read(image("astronaut_32.png")).unwrap();
    std::fs::write(imgs.join("truncated.png"), &whole[..whole.len() / 2]).unwrap();
    std::fs::write(imgs.join("text.png"), b"this is not an image").unwrap();
    std::fs::write(d.join("outside.png"), &whole).unwrap();
    // symlinks in the image folder: one out of it, one to a file inside it
    std::os::unix::fs::symlink(d.join("outside.png"), imgs.join("link_out.png")).unwrap();
    std::os::unix::fs::symlink(imgs.join("astronaut_32.png"), imgs.join("link_in.png")).unwrap();
    let q = "<image>\nWhat is shown?";
    let mut lines = vec![
        rec("grey", "grey.png", q, "A grey field."),
        rec("rgba", "rgba.png", q, "A red field."),
        rec("deep", "deep.png", q, "A pink field."),
        rec("huge", "huge.png", q, "A dark field."),
        rec("dot", "dot.png", q, "A dot."),
        rec("cmyk", "cmyk_12x8.jpg", q, "A cat."),
        rec("exif", "exif_rotated_12x8.jpg", q, "A cat."),
        rec(
            "plain",
            "astronaut_32.png",
            "Describe it.\n<image>",
            "An astronaut.",
        ),
        rec("truncated", "truncated.png", q, "Half a picture."),
        rec("text", "text.png", q, "Nothing."),
        rec("missing", "nowhere.png", q, "Nothing."),
        rec("outside", "../outside.png", q, "An astronaut."),
        rec("empty", "astronaut_32.png", q, "   "),
        rec(
            "two-markers",
            "astronaut_32.png",
            "<image>\n<image>\nCompare.",
            "Same.",
        ),
        r#"{"id": "broken", "image": "astronaut_32.png", "conversations": [}"#.to_string(),
        rec("roles", "astronaut_32.png", q, "x").replace("\"human\"", "\"narrator\""),
        rec("link-out", "link_out.png", q, "An astronaut."),
        rec("link-in", "link_in.png", q, "An astronaut."),
    ];
    // a record whose text holds bytes that are not UTF-8
    let mut bytes = b"\xEF\xBB\xBF".to_vec(); // and the file starts with a byte-order mark
    bytes.extend(lines.remove(0).into_bytes());
    for l in &lines {
        bytes.push(b'\n');
        bytes.extend(l.as_bytes());
    }
    bytes.extend(b"\n{\"id\": \"latin1\", \"image\": \"grey.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nCaf\xE9?\"}, {\"from\": \"gpt\", \"value\": \"Yes.\"}]}\n");
    std::fs::write(d.join("data.jsonl"), bytes).unwrap();
    let valid = vec![
        "grey", "rgba", "deep", "huge", "dot", "cmyk", "exif", "plain", "link-in",
    ];
    let bad = vec![
        ("truncated", "unreadable_media"),
        ("text", "unreadable_media"),
        ("missing", "missing_media"),
        ("outside", "outside_root"),
        ("link-out", "outside_root"),
        ("empty", "empty_answer"),
        ("two-markers", "markers"),
        ("data.jsonl:15", "record"),
        ("roles", "record"),
        ("data.jsonl:19", "record"),
    ];
    (valid, bad)
}

fn recipe(d: &Path, policy: &str) -> String {
    format!(
        r#"name = "nasty"
seed = 1
pipeline = ["sft"]
output = {out:?}
[model]
from = {model:?}
[stages.sft]
kind = "instruct"
data = {{ sources = [{{ kind = "llava_json", path = {data:?}, images = {imgs:?} }}] }}
template = "vicuna_v1"
batch = {{ global = 2, micro = 1 }}
optim = {{ kind = "adamw", lr = 1e-3 }}
train = ["connector"]
max_steps = 2
max_len = 1024
log_every = 1
on_bad_sample = "{policy}"
"#,
        out = d.join("runs").display().to_string(),
        model = fixture("llava_clip_llama").display().to_string(),
        data = d.join("data.jsonl").display().to_string(),
        imgs = d.join("imgs").display().to_string(),
    )
}

#[test]
fn every_bad_sample_is_reported_at_once_and_valid_ones_train() {
    let d = scratch("nasty");
    let (valid, bad) = nasty(&d);
    let r = d.join("r.toml");
    std::fs::write(&r, recipe(&d, "skip")).unwrap();
    let (stdout, stderr) = common::validate_data(&r);
    assert!(
        stdout.contains(&format!(
            "{} samples ok, {} skipped",
            valid.len(),
            bad.len()
        )),
        "{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("{} bad sample(s)", bad.len())),
        "{stderr}"
    );
    // the full list: every bad sample with its kind
    let list = std::fs::read_to_string(d.join("runs/nasty/validate/sft-bad.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = list
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), bad.len(), "{list}");
    for (id, kind) in &bad {
        let row = rows
            .iter()
            .find(|r| r["id"].as_str().unwrap().contains(id))
            .unwrap_or_else(|| panic!("{id} not listed: {list}"));
        assert_eq!(row["kind"], *kind, "{id}: {row}");
    }
    // with `skip`, training finishes on the valid samples and lists the bad ones
    let (ok, err) = run_mitune(&["train", r.to_str().unwrap()], None);
    assert!(ok, "{err}");
    let skipped = std::fs::read_to_string(d.join("runs/nasty/sft/skipped.jsonl")).unwrap();
    assert_eq!(skipped.lines().count(), bad.len());
    // with `fail`, it stops before step 1, naming every kind
    std::fs::write(&r, recipe(&d, "fail").replace("runs", "runs-fail")).unwrap();
    let (ok, err) = run_mitune(&["train", r.to_str().unwrap()], None);
    assert!(!ok, "{err}");
    for kind in [
        "unreadable media",
        "missing media",
        "outside the image folder",
        "empty answer",
        "markers",
        "record",
    ] {
        assert!(err.contains(kind), "{kind}: {err}");
    }
    assert!(
        !d.join("runs-fail/nasty/metrics.jsonl").exists()
            || std::fs::read_to_string(d.join("runs-fail/nasty/metrics.jsonl"))
                .unwrap()
                .lines()
                .all(|l| !l.contains("\"step\""))
    );
}

/// A file that breaks after the dataset's checks: the micro-batch leaves its sample out and names it; `to_input`
/// (the stages that cannot drop a row) refuses the batch.
#[test]
fn media_broken_mid_run_follow_the_policy() {
    let d = scratch("nasty-mid");
    let imgs = d.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::copy(image("astronaut_32.png"), imgs.join("a.png")).unwrap();
    std::fs::copy(image("astronaut_32.png"), imgs.join("b.png")).unwrap();
    let mut f = std::fs::File::create(d.join("data.jsonl")).unwrap();
    for (id, img) in [("a", "a.png"), ("b", "b.png")] {
        writeln!(f, "{}", rec(id, img, "<image>\nWhat?", "An astronaut.")).unwrap();
    }
    let device = burn::tensor::Device::flex();
    let built = mitune::model::load_dir(&fixture("llava_clip_llama"), &device).unwrap();
    let rc: mitune::recipe::schema::Recipe = toml::from_str(&recipe(&d, "skip")).unwrap();
    let t = rc.stages["sft"].train().unwrap();
    let src = mitune::data::templates::training_source(t.template, &built.text).unwrap();
    let p = mitune::data::prepare::prepare(
        &t.data,
        &built.text,
        &src,
        1024,
        0,
        mitune::recipe::schema::OnBad::Fail,
        &d,
        "skipped.jsonl",
        "data",
    )
    .unwrap();
    // b.png breaks after the checks
    std::fs::write(imgs.join("b.png"), b"gone").unwrap();
    let refs: Vec<_> = p.encoded.iter().collect();
    let mb = mitune::data::loader::micro_batch(&refs, built.text.pad_id(), &built.images);
    assert_eq!(mb.ids.len(), 1, "the broken sample is left out");
    assert_eq!(mb.dropped.len(), 1);
    assert!(mb.dropped[0].1.contains("b.png"), "{:?}", mb.dropped);
    let err = mitune::stages::backward::to_input(&mb, &device)
        .err()
        .unwrap();
    assert!(err.to_string().contains("failed to load"), "{err}");
}
