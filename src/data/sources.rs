//! Dataset readers: each public layout becomes the same [`Sample`] (messages + image paths + clips). Layouts follow
//! shared/formats/: LLaVA JSON/JSONL (`conversations` of human/gpt turns, LLaVA-Pretrain uses it too), ShareGPT-style
//! `messages` (role/content + `images`, LLaMA-Factory's mllm_demo), caption pairs, VQA pairs (turned into
//! instructions: the survey's data adaptation), and raw text for causal-LM pre-training.
//! A malformed record is not an error of the whole file: it becomes a [`Bad`] with file, index, id and reason, and
//! the stage's `on_bad_sample` policy decides.
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;
use std::path::{Path, PathBuf};

use super::tokenizer::VIDEO_MARKER;
use super::video::ClipSource;
use crate::error::{Error, Result};
use crate::recipe::schema::Source;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub id: String,
    /// Where the record is, for reports: `file:index (id)`.
    pub origin: String,
    /// Index of the source in the stage's data spec (for mixtures and logs).
    pub source: usize,
    pub images: Vec<PathBuf>,
    /// Clips, in `<video>` marker order (a LLaVA-Video record's `video`, a ShareGPT record's `videos`).
    pub videos: Vec<ClipSource>,
    pub messages: Vec<(Role, String)>,
    /// Raw text for causal-LM pre-training: every token supervised, no template.
    pub raw_text: Option<String>,
    /// Extra fields of the record (e.g. `task`, `kind` of held-out sets).
    pub meta: Value,
}

pub use super::contract::Bad;
use super::contract::Kind;

/// Caption instructions sampled per sample (LLaVA-Pretrain's brief-description pool, abridged).
pub const CAPTION_POOL: [&str; 6] = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the subsequent image.",
    "Summarize the visual content of the image.",
    "Write a terse but informative summary of the picture.",
    "Share a concise interpretation of the image provided.",
];

/// One record of a dataset file: where it is (`:LINE` of JSON lines, `[INDEX]` of a JSON array) and its value, or
/// why that record alone cannot be read.
pub struct Record {
    pub at: String,
    pub value: std::result::Result<Value, String>,
}

impl Record {
    /// The record's value; a record that cannot be read becomes a bad sample named by `path` and its position.
    pub fn value_or_bad(&self, path: &Path, bad: &mut Vec<Bad>) -> Option<&Value> {
        match &self.value {
            Ok(v) => Some(v),
            Err(reason) => {
                bad.push(Bad::new(
                    format!("{}{}", path.display(), self.at),
                    Kind::Record,
                    reason.clone(),
                ));
                None
            }
        }
    }
}

/// Reads a dataset file: a JSON array, or JSON lines (`.jsonl`, or any file that is not one JSON value). A UTF-8
/// byte-order mark is skipped. A broken line (invalid JSON, bytes that are not UTF-8) is that record's problem,
/// not the file's; a JSON array that does not parse is the file's (its records cannot be told apart).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let bytes = crate::error::read(path)?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    if !jsonl && first == Some(b'[') {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let at = e.valid_up_to();
            let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            Error::file(
                path,
                format!("not UTF-8 text (line {line}, byte {at}): re-encode the file as UTF-8"),
            )
        })?;
        return match serde_json::from_str(text) {
            Ok(Value::Array(a)) => Ok(a
                .into_iter()
                .enumerate()
                .map(|(i, v)| Record {
                    at: format!("[{i}]"),
                    value: Ok(v),
                })
                .collect()),
            Ok(_) => Err(Error::file(path, "expected a JSON array of records")),
            Err(e) => Err(Error::file(path, format!("invalid JSON: {e}"))),
        };
    }
    let mut out = vec![];
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value = std::str::from_utf8(line)
            .map_err(|e| format!("not UTF-8 text (byte {} of the line)", e.valid_up_to()))
            .and_then(|l| serde_json::from_str(l).map_err(|e| format!("invalid JSON: {e}")));
        out.push(Record {
            at: format!(":{}", i + 1),
            value,
        });
    }
    Ok(out)
}

fn image_list(r: &Value, base: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let one = r.get("image");
    let many = r.get("images");
    let names: Vec<&Value> = match (one, many) {
        (Some(Value::String(_)), _) => vec![one.unwrap()],
        (Some(Value::Array(a)), _) | (None, Some(Value::Array(a))) => a.iter().collect(),
        (None, None) | (Some(Value::Null), _) => vec![],
        _ => return Err("`image`/`images` must be a string or a list of strings".into()),
    };
    names
        .into_iter()
        .map(|v| {
            v.as_str()
                .map(|s| base.join(s))
                .ok_or_else(|| "image paths must be strings".to_string())
        })
        .collect()
}

/// A record's clips: LLaVA-Video's `video` (one clip, or a list of clips) and ShareGPT/LLaMA-Factory's `videos` (a
/// list of clips); a clip is a frame directory or a list of frame files.
fn video_list(r: &Value, base: &Path) -> std::result::Result<Vec<ClipSource>, String> {
    match (r.get("video"), r.get("videos")) {
        (Some(Value::Null), _) | (None, None) | (None, Some(Value::Null)) => Ok(vec![]),
        (Some(v @ Value::String(_)), _) => Ok(vec![ClipSource::from_json(v, base)?]),
        (Some(Value::Array(a)), _) | (None, Some(Value::Array(a))) => {
            // `video: [frame, frame, ...]` is one clip's frames; `videos: [...]` lists clips
            if r.get("video").is_some() && a.iter().all(Value::is_string) {
                return Ok(vec![ClipSource::from_json(&Value::Array(a.clone()), base)?]);
            }
            a.iter().map(|v| ClipSource::from_json(v, base)).collect()
        }
        _ => Err(
            "`video`/`videos` must be a frame directory, a list of frame files or a list of clips"
                .into(),
        ),
    }
}

/// LLaVA-Video's records mark their clip with `<image>`: with a clip and no image, that marker is the clip's.
fn video_markers(
    images: &[PathBuf],
    videos: &[ClipSource],
    mut msgs: Vec<(Role, String)>,
) -> Vec<(Role, String)> {
    let has_video_marker = msgs.iter().any(|(_, c)| c.contains(VIDEO_MARKER));
    if images.is_empty() && !videos.is_empty() && !has_video_marker {
        for (_, c) in &mut msgs {
            *c = c.replace("<image>", VIDEO_MARKER);
        }
    }
    msgs
}

fn str_field<'a>(r: &'a Value, key: &str) -> std::result::Result<&'a str, String> {
    r.get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("missing string field `{key}`"))
}

fn meta(r: &Value, known: &[&str]) -> Value {
    match r {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| !known.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        _ => Value::Null,
    }
}

fn turns(
    list: &Value,
    role_key: &str,
    text_key: &str,
) -> std::result::Result<Vec<(Role, String)>, String> {
    let list = list.as_array().ok_or("turns must be a list")?;
    let mut out = vec![];
    for (i, t) in list.iter().enumerate() {
        let role = t.get(role_key).and_then(|r| r.as_str()).unwrap_or("");
        let role = match role {
            "human" | "user" => Role::User,
            "gpt" | "assistant" | "model" => Role::Assistant,
            "system" => Role::System,
            other => {
                return Err(format!(
                    "turn {i}: unknown role `{other}` (human/gpt or user/assistant/system)"
                ));
            }
        };
        let text = t
            .get(text_key)
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("turn {i}: missing string `{text_key}`"))?;
        // after an optional system turn, user and assistant alternate, the user first
        let expected = match out.last().map(|(r, _)| *r) {
            None | Some(Role::System) | Some(Role::Assistant) => Role::User,
            Some(Role::User) => Role::Assistant,
        };
        if role != expected && !(role == Role::System && out.is_empty()) {
            return Err(format!(
                "turn {i} is `{}` where a `{}` turn belongs: turns start with the user (after an optional \
                 system turn) and alternate user / assistant",
                role.as_str(),
                expected.as_str()
            ));
        }
        out.push((role, text.to_string()));
    }
    Ok(out)
}

/// Reads one source. `rng_seed` drives the instruction sampling of caption sources (deterministic).
pub fn load(source: &Source, index: usize, rng_seed: u64) -> Result<(Vec<Sample>, Vec<Bad>)> {
    let (path, images, cap) = match source {
        Source::LlavaJson {
            path, images, cap, ..
        }
        | Source::Messages {
            path, images, cap, ..
        }
        | Source::Captions {
            path, images, cap, ..
        }
        | Source::Vqa {
            path, images, cap, ..
        } => (path, images.clone(), *cap),
        Source::Text { path, cap, .. } => (path, None, *cap),
    };
    let base = images.unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    let mut recs = read_records(path)?;
    if let Some(c) = cap {
        recs.truncate(c);
    }
    let mut rng = StdRng::seed_from_u64(rng_seed ^ (index as u64).wrapping_mul(0x9E37_79B9));
    let (mut good, mut bad) = (vec![], vec![]);
    for rec in &recs {
        let Some(r) = rec.value_or_bad(path, &mut bad) else {
            continue;
        };
        let id = r
            .get("id")
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap_or_else(|| rec.at.clone());
        let parsed = parse(source, r, &base, &mut rng);
        match parsed {
            Ok((images, videos, messages, raw_text, known)) => {
                let origin = format!("{}{} ({id})", path.display(), rec.at);
                if let Some(p) = images
                    .iter()
                    .map(PathBuf::as_path)
                    .chain(videos.iter().map(|v| v.path()))
                    .find(|p| escapes(&base, p))
                {
                    bad.push(Bad::new(
                        origin,
                        Kind::OutsideRoot,
                        format!(
                            "{} leads outside the image folder {} (`..` or a symlink)",
                            p.display(),
                            base.display()
                        ),
                    ));
                    continue;
                }
                good.push(Sample {
                    id,
                    origin,
                    source: index,
                    images,
                    videos,
                    messages,
                    raw_text,
                    meta: meta(r, known),
                })
            }
            Err(reason) => bad.push(Bad::new(
                format!("{}{} ({id})", path.display(), rec.at),
                Kind::Record,
                reason,
            )),
        }
    }
    Ok((good, bad))
}

/// Whether a record's relative media path, joined to the source's folder, leads out of it: with `..`, or through a
/// symlink inside the folder that points elsewhere (the folder itself may be a symlink: it is resolved too). An
/// absolute path in the record is the user's explicit choice (LLaMA-Factory datasets often hold them) and is not
/// checked.
fn escapes(base: &Path, joined: &Path) -> bool {
    if climbs(base, joined) {
        return true;
    }
    if !joined.starts_with(base) {
        return false; // absolute in the record
    }
    // a file that does not exist is reported as missing, not here
    match (std::fs::canonicalize(base), std::fs::canonicalize(joined)) {
        (Ok(root), Ok(file)) => !file.starts_with(root),
        _ => false,
    }
}

/// `escapes`' lexical half: `..` components that climb above the folder.
fn climbs(base: &Path, joined: &Path) -> bool {
    use std::path::Component;
    let Ok(rel) = joined.strip_prefix(base) else {
        return false; // absolute in the record
    };
    let mut depth = 0i64;
    for c in rel.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

type Parsed = (
    Vec<PathBuf>,
    Vec<ClipSource>,
    Vec<(Role, String)>,
    Option<String>,
    &'static [&'static str],
);

fn parse(
    source: &Source,
    r: &Value,
    base: &Path,
    rng: &mut StdRng,
) -> std::result::Result<Parsed, String> {
    let with_marker = |text: &str, rng: &mut StdRng| {
        if rng.random_bool(0.5) {
            format!("<image>\n{text}")
        } else {
            format!("{text}\n<image>")
        }
    };
    match source {
        Source::LlavaJson { .. } => {
            let conv = r.get("conversations").ok_or("missing `conversations`")?;
            let (images, videos) = (image_list(r, base)?, video_list(r, base)?);
            let msgs = video_markers(&images, &videos, turns(conv, "from", "value")?);
            Ok((
                images,
                videos,
                msgs,
                None,
                &["id", "image", "images", "video", "videos", "conversations"],
            ))
        }
        Source::Messages { .. } => {
            let conv = r.get("messages").ok_or("missing `messages`")?;
            let (images, videos) = (image_list(r, base)?, video_list(r, base)?);
            let msgs = video_markers(&images, &videos, turns(conv, "role", "content")?);
            Ok((
                images,
                videos,
                msgs,
                None,
                &["id", "images", "videos", "messages"],
            ))
        }
        Source::Captions { instructions, .. } => {
            let caption = str_field(r, "caption")?;
            let pool: Vec<&str> = if instructions.is_empty() {
                CAPTION_POOL.to_vec()
            } else {
                instructions.iter().map(String::as_str).collect()
            };
            let q = with_marker(pool[rng.random_range(0..pool.len())], rng);
            let msgs = vec![(Role::User, q), (Role::Assistant, caption.to_string())];
            Ok((
                image_list(r, base)?,
                vec![],
                msgs,
                None,
                &["id", "image", "caption"],
            ))
        }
        Source::Vqa { hint, .. } => {
            let q = str_field(r, "question")?;
            let a = str_field(r, "answer")?;
            let q = with_marker(&format!("{q}\n{hint}"), rng);
            let msgs = vec![(Role::User, q), (Role::Assistant, a.to_string())];
            Ok((
                image_list(r, base)?,
                vec![],
                msgs,
                None,
                &["id", "image", "question", "answer"],
            ))
        }
        Source::Text { .. } => Ok((
            vec![],
            vec![],
            vec![],
            Some(str_field(r, "text")?.to_string()),
            &["id", "text"],
        )),
    }
}
