//! Evaluation sets as users bring them, one loader for four tasks. A file is a JSON array, JSON lines (also with
//! a `.json` name, as POPE ships), or an object keyed by id (ScienceQA's `problems.json`). Fields are read by the
//! names the public sets use:
//! - `vqa`: `question` (or `text`, or a LLaVA `conversations` pair), reference `answers` (strings or VQAv2's
//!   `{answer}` objects) or one `answer`;
//! - `mc`: `question`, `choices` (or `options`), `answer` (index, letter or option text), optional `hint`
//!   (ScienceQA's context) and `category`/`subject`;
//! - `pope`: `text` (or `question`), `label` yes/no, optional `category` (random / popular / adversarial);
//! - `caption`: references in `captions`/`references`/`answers` (or one `caption`), optional `prompt`.
//!
//! Images: `image` or `images`, relative to `--images` (default: the file's folder); ScienceQA's bare
//! `"image.png"` in a keyed file means `<images>/<pid>/image.png`. Every problem is a per-sample reason, so the
//! caller applies its fail/skip policy and names the sample.
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, read_string};

pub use crate::recipe::schema::TaskKind;

/// One evaluation sample.
#[derive(Debug, Clone, Default)]
pub struct Item {
    pub id: String,
    pub images: Vec<PathBuf>,
    /// The question (caption: the instruction), with `<image>` markers where the file put them.
    pub question: String,
    /// Context shown before the question (ScienceQA's hint).
    pub context: String,
    /// vqa / caption references.
    pub refs: Vec<String>,
    /// mc options and the index of the right one.
    pub choices: Vec<String>,
    pub answer: Option<usize>,
    /// pope: whether the object is present.
    pub label: Option<bool>,
    pub category: Option<String>,
}

impl Item {
    /// The reference answer as a demonstration shows it (M-ICL).
    pub fn demo_answer(&self, task: TaskKind) -> String {
        match task {
            TaskKind::Vqa | TaskKind::Caption => self.refs.first().cloned().unwrap_or_default(),
            TaskKind::Mc => self
                .answer
                .map(|a| super::metrics::letter(a).to_string())
                .unwrap_or_default(),
            TaskKind::Pope => if self.label == Some(true) {
                "yes"
            } else {
                "no"
            }
            .into(),
        }
    }
}

/// A sample that could not be used, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Bad {
    pub id: String,
    pub reason: String,
}

pub const DEFAULT_CAPTION_PROMPT: &str = "Describe the image briefly.";

/// (id, record) pairs of a file in any of the three layouts; `keyed` when ids come from object keys.
fn records(path: &Path) -> Result<(Vec<(Option<String>, Value)>, bool)> {
    let text = read_string(path)?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(a)) => Ok((a.into_iter().map(|v| (None, v)).collect(), false)),
        Ok(Value::Object(o)) if o.values().all(Value::is_object) && !o.is_empty() => {
            Ok((o.into_iter().map(|(k, v)| (Some(k), v)).collect(), true))
        }
        Ok(Value::Object(_)) if !text.trim_end().contains('\n') => {
            Ok((vec![(None, serde_json::from_str(&text).unwrap())], false))
        }
        Ok(_) => Err(Error::file(
            path,
            "expected a JSON array, JSON lines, or an object keyed by sample id",
        )),
        Err(_) => {
            let mut out = vec![];
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v = serde_json::from_str(line)
                    .map_err(|e| Error::file(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
                out.push((None, v));
            }
            Ok((out, false))
        }
    }
}

fn str_field<'a>(r: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| r.get(*k).and_then(Value::as_str))
}

fn id_of(key: Option<String>, r: &Value, i: usize) -> String {
    key.or_else(|| {
        ["question_id", "id"].iter().find_map(|k| {
            r.get(*k).map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
        })
    })
    .unwrap_or_else(|| format!("#{i}"))
}

/// LLaVA `conversations`: (the last human turn before the last gpt turn, that gpt turn).
fn conversation(r: &Value) -> Option<(String, String)> {
    let turns = r.get("conversations")?.as_array()?;
    let last = turns
        .iter()
        .rposition(|t| t.get("from").and_then(Value::as_str) == Some("gpt"))?;
    let q = turns[..last]
        .iter()
        .rev()
        .find(|t| t.get("from").and_then(Value::as_str) == Some("human"))?;
    Some((
        q.get("value")?.as_str()?.to_string(),
        turns[last].get("value")?.as_str()?.to_string(),
    ))
}

fn strings(v: &Value) -> std::result::Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                // VQAv2 annotations: {"answer": "...", "answer_confidence": ..., "answer_id": ...}
                Value::Object(o) => o
                    .get("answer")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| "an answer object without `answer`".to_string()),
                _ => Err("answers must be strings".to_string()),
            })
            .collect(),
        _ => Err("answers must be a string or a list".into()),
    }
}

fn images(r: &Value, base: &Path, key: Option<&str>) -> std::result::Result<Vec<PathBuf>, String> {
    let names: Vec<&Value> = match (r.get("image"), r.get("images")) {
        (Some(Value::Array(a)), _) | (None | Some(Value::Null), Some(Value::Array(a))) => {
            a.iter().collect()
        }
        (Some(v @ Value::String(_)), _) => vec![v],
        (None | Some(Value::Null), None | Some(Value::Null)) => vec![],
        _ => return Err("`image`/`images` must be a string or a list of strings".into()),
    };
    names
        .into_iter()
        .map(|v| {
            let s = v.as_str().ok_or("image paths must be strings")?;
            // ScienceQA: problems.json says "image.png"; the file is images/<split>/<pid>/image.png
            Ok(match key {
                Some(k) if !s.contains('/') => base.join(k).join(s),
                _ => base.join(s),
            })
        })
        .collect()
}

fn item(
    task: TaskKind,
    key: Option<String>,
    r: &Value,
    i: usize,
    base: &Path,
) -> std::result::Result<Item, Bad> {
    let id = id_of(key.clone(), r, i);
    let bad = |reason: String| Bad {
        id: id.clone(),
        reason,
    };
    let mut it = Item {
        id: id.clone(),
        images: images(r, base, key.as_deref()).map_err(bad)?,
        category: str_field(r, &["category", "kind", "subject"]).map(str::to_string),
        ..Item::default()
    };
    let conv = conversation(r);
    let question = str_field(r, &["question", "text", "prompt"])
        .map(str::to_string)
        .or_else(|| conv.as_ref().map(|c| c.0.clone()));
    match task {
        TaskKind::Vqa => {
            it.question = question.ok_or_else(|| bad("no `question` (or `text`)".into()))?;
            it.refs = match r.get("answers").or_else(|| r.get("answer")) {
                Some(v) => strings(v).map_err(bad)?,
                None => conv.map(|c| vec![c.1]).unwrap_or_default(),
            };
        }
        TaskKind::Mc => {
            it.question = question.ok_or_else(|| bad("no `question`".into()))?;
            let choices = r
                .get("choices")
                .or_else(|| r.get("options"))
                .ok_or_else(|| bad("no `choices` (or `options`)".into()))?;
            it.choices = strings(choices).map_err(|m| bad(format!("choices: {m}")))?;
            if it.choices.len() < 2 || it.choices.len() > 26 {
                return Err(bad(format!(
                    "{} choices: a multiple-choice question needs 2 to 26",
                    it.choices.len()
                )));
            }
            it.context = str_field(r, &["hint", "context"]).unwrap_or("").to_string();
            it.answer = match r.get("answer") {
                None => None,
                Some(Value::Number(n)) => {
                    let k = n.as_u64().unwrap_or(u64::MAX) as usize;
                    if k >= it.choices.len() {
                        return Err(bad(format!(
                            "answer {n} is outside the {} choices (answers index choices from 0)",
                            it.choices.len()
                        )));
                    }
                    Some(k)
                }
                Some(Value::String(s)) => Some(
                    super::metrics::extract_choice(s, &it.choices).ok_or_else(|| {
                        bad(format!(
                            "answer {s:?} is neither a letter A-{} nor one of the choices",
                            super::metrics::letter(it.choices.len() - 1)
                        ))
                    })?,
                ),
                Some(_) => return Err(bad("`answer` must be an index or a letter".into())),
            };
        }
        TaskKind::Pope => {
            it.question = question.ok_or_else(|| bad("no `text` (or `question`)".into()))?;
            let label = str_field(r, &["label", "answer"])
                .map(str::to_string)
                .or_else(|| conv.map(|c| c.1));
            it.label = match label.as_deref().map(|l| l.trim().to_lowercase()) {
                None => None,
                Some(l) if l == "yes" => Some(true),
                Some(l) if l == "no" => Some(false),
                Some(l) => return Err(bad(format!("label {l:?}: expected \"yes\" or \"no\""))),
            };
        }
        TaskKind::Caption => {
            it.question = str_field(r, &["prompt", "question"])
                .map(str::to_string)
                .or_else(|| conv.as_ref().map(|c| c.0.clone()))
                .unwrap_or_else(|| DEFAULT_CAPTION_PROMPT.into());
            it.refs = match ["captions", "references", "answers", "caption"]
                .iter()
                .find_map(|k| r.get(*k))
            {
                Some(v) => strings(v).map_err(bad)?,
                None => conv.map(|c| vec![c.1]).unwrap_or_default(),
            };
        }
    }
    let markers = it.question.matches("<image>").count();
    if markers > 0 && markers != it.images.len() {
        return Err(bad(format!(
            "{markers} <image> marker(s) but {} image(s)",
            it.images.len()
        )));
    }
    if let Some(missing) = it.images.iter().find(|p| !p.exists()) {
        return Err(bad(format!("image {} does not exist", missing.display())));
    }
    Ok(it)
}

/// Loads a task's samples: the good ones and the bad ones with their reasons.
pub fn load(
    task: TaskKind,
    path: &Path,
    images_dir: Option<&Path>,
) -> Result<(Vec<Item>, Vec<Bad>)> {
    let (recs, _) = records(path)?;
    let base = images_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    let (mut good, mut bad) = (vec![], vec![]);
    for (i, (key, r)) in recs.into_iter().enumerate() {
        if !r.is_object() {
            bad.push(Bad {
                id: format!("#{i}"),
                reason: "not a JSON object".into(),
            });
            continue;
        }
        match item(task, key, &r, i, &base) {
            Ok(it) => good.push(it),
            Err(b) => bad.push(b),
        }
    }
    Ok((good, bad))
}

/// Why an item cannot be scored (no reference), if it cannot.
pub fn unscored(task: TaskKind, it: &Item) -> Option<String> {
    let missing = match task {
        TaskKind::Vqa | TaskKind::Caption => it.refs.is_empty(),
        TaskKind::Mc => it.answer.is_none(),
        TaskKind::Pope => it.label.is_none(),
    };
    missing.then(|| {
        format!(
            "no reference answer: {} needs {}",
            task.name(),
            match task {
                TaskKind::Vqa => "`answers` or `answer`",
                TaskKind::Caption => "`captions`",
                TaskKind::Mc => "`answer` (index or letter)",
                TaskKind::Pope => "`label` (yes/no)",
            }
        )
    })
}
