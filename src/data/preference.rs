//! Preference pairs for the alignment stages: a prompt (a conversation ending with a user turn, images
//! attached), a chosen and a rejected response. Read from mitune's own JSONL or imported from the public layouts
//! the survey names (see shared formats notes):
//! - `pairs` (mitune): `{id, image|images, prompt | conversations (LLaVA, ending with a human turn), chosen,
//!   rejected}`;
//! - `llava_rlhf`: LLaVA-RLHF human preference (`conversations` ending with a gpt turn that each candidate
//!   replaces, `output_1`/`output_2`, `preference` 1 or 2);
//! - `rlhf_v`: RLHF-V rows (`text` is a JSON string `{question, chosen, rejected}`, the human correction is
//!   chosen; image at `image.path` or `image_path`);
//! - `vlfeedback`: scored completions, paired as Silkie does (every two completions, mean of the aspect ratings,
//!   higher = chosen, ties and non-numeric ratings dropped);
//! - `llamafactory`: sharegpt ranking (`conversations` ending with a human turn, `chosen`/`rejected` `{from,
//!   value}`, `images`);
//! - `trl`: TRL's conversational vision DPO (`prompt`/`chosen`/`rejected` message lists with typed content,
//!   `images`).
//!
//! Prompts-only records (`{id, image, prompt, answer?}`) for PPO/GRPO are read by `load_prompts`; unpaired
//! completions for KTO (`{id, image|images, prompt | conversations, completion, label}`, TRL's unpaired layout, or
//! any pair layout read as a desirable chosen and an undesirable rejected example) by `load_unpaired`.
use serde_json::Value;
use std::path::{Path, PathBuf};

use super::contract::{Bad, Kind};
use super::sources::{Role, read_records};
use crate::error::Result;

pub use crate::recipe::schema::{PairFormat, UnpairedFormat};

#[derive(Debug, Clone)]
pub struct Pair {
    pub id: String,
    pub images: Vec<PathBuf>,
    /// The conversation so far, ending with the user turn the responses answer; `<image>` markers included.
    pub history: Vec<(Role, String)>,
    pub chosen: String,
    pub rejected: String,
}

/// One completion of a prompt, labelled desirable (`true`) or undesirable, for KTO.
#[derive(Debug, Clone)]
pub struct Unpaired {
    pub id: String,
    pub images: Vec<PathBuf>,
    /// The conversation so far, ending with the user turn the completion answers; `<image>` markers included.
    pub history: Vec<(Role, String)>,
    pub completion: String,
    pub label: bool,
}

/// A prompt for on-policy stages (PPO, GRPO), with an optional reference answer for rule rewards.
#[derive(Debug, Clone)]
pub struct PromptItem {
    pub id: String,
    pub images: Vec<PathBuf>,
    pub history: Vec<(Role, String)>,
    pub answer: Option<String>,
}

fn s<'a>(r: &'a Value, k: &str) -> Option<&'a str> {
    r.get(k).and_then(Value::as_str)
}

fn image_paths(r: &Value, base: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let v = r
        .get("images")
        .or_else(|| r.get("image"))
        .or_else(|| r.get("image_path"))
        .or_else(|| r.get("img_path"));
    let names: Vec<String> = match v {
        None | Some(Value::Null) => vec![],
        Some(Value::String(x)) => vec![x.clone()],
        // RLHF-V / RLAIF-V parquet rows: {bytes, path}
        Some(Value::Object(o)) => match o.get("path").and_then(Value::as_str) {
            Some(p) => vec![p.to_string()],
            None => {
                return Err("embedded image bytes are not supported: give the image path".into());
            }
        },
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "image paths must be strings".to_string())
            })
            .collect::<std::result::Result<_, _>>()?,
        Some(_) => return Err("`image`/`images` must be a path or a list of paths".into()),
    };
    Ok(names.into_iter().map(|n| base.join(n)).collect())
}

/// LLaVA `{from, value}` turns.
fn llava_turns(v: &Value) -> std::result::Result<Vec<(Role, String)>, String> {
    v.as_array()
        .ok_or("`conversations` must be a list")?
        .iter()
        .map(|t| {
            let role = match s(t, "from").or_else(|| s(t, "role")) {
                Some("human" | "user") => Role::User,
                Some("gpt" | "assistant") => Role::Assistant,
                Some("system") => Role::System,
                other => return Err(format!("unknown speaker {other:?}")),
            };
            let text = s(t, "value")
                .or_else(|| s(t, "content"))
                .ok_or("a turn without `value`")?;
            Ok((role, text.to_string()))
        })
        .collect()
}

/// TRL messages: `{role, content}` with content a string or typed parts (`{type: image}` becomes `<image>`).
fn trl_messages(v: &Value) -> std::result::Result<Vec<(Role, String)>, String> {
    v.as_array()
        .ok_or("messages must be a list")?
        .iter()
        .map(|m| {
            let role = match s(m, "role") {
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                Some("system") => Role::System,
                other => return Err(format!("unknown role {other:?}")),
            };
            let text = match m.get("content") {
                Some(Value::String(x)) => x.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match s(p, "type") {
                        Some("image") => "<image>\n".to_string(),
                        _ => s(p, "text").unwrap_or("").to_string(),
                    })
                    .collect(),
                _ => return Err("a message without content".into()),
            };
            Ok((role, text))
        })
        .collect()
}

fn response(v: Option<&Value>) -> std::result::Result<String, String> {
    match v {
        Some(Value::String(x)) => Ok(x.clone()),
        Some(Value::Object(o)) => o
            .get("value")
            .or_else(|| o.get("content"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| "a response object without `value`".into()),
        Some(a @ Value::Array(_)) => Ok(trl_messages(a)?
            .into_iter()
            .map(|m| m.1)
            .collect::<Vec<_>>()
            .join("")),
        _ => Err("missing response".into()),
    }
}

fn id_of(r: &Value, i: usize) -> String {
    ["id", "idx", "question_id"]
        .iter()
        .find_map(|k| r.get(*k))
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        })
        .unwrap_or_else(|| format!("#{i}"))
}

/// Silkie's pairing of scored completions: mean of the aspect ratings, every two completions, ties dropped.
fn vlfeedback_pairs(r: &Value) -> std::result::Result<Vec<(String, String)>, String> {
    let comps = r
        .get("completions")
        .and_then(Value::as_array)
        .ok_or("no `completions` list")?;
    let scored: Vec<(String, Option<f64>)> = comps
        .iter()
        .map(|c| {
            let resp = s(c, "response").unwrap_or("").to_string();
            let ratings: Option<Vec<f64>> = c
                .get("annotations")
                .and_then(Value::as_object)
                .map(|a| {
                    a.values()
                        .map(|x| x.get("Rating").and_then(Value::as_str)?.trim().parse().ok())
                        .collect::<Option<Vec<f64>>>()
                })
                .flatten();
            let mean = ratings
                .filter(|v| !v.is_empty())
                .map(|v| v.iter().sum::<f64>() / v.len() as f64);
            (resp, mean)
        })
        .collect();
    let mut out = vec![];
    for i in 0..scored.len() {
        for j in i + 1..scored.len() {
            if let (Some(a), Some(b)) = (scored[i].1, scored[j].1) {
                if a > b {
                    out.push((scored[i].0.clone(), scored[j].0.clone()));
                } else if b > a {
                    out.push((scored[j].0.clone(), scored[i].0.clone()));
                }
            }
        }
    }
    Ok(out)
}

/// One record -> pairs (VLFeedback gives several).
fn parse(
    fmt: PairFormat,
    r: &Value,
    base: &Path,
) -> std::result::Result<Vec<(Vec<PathBuf>, Vec<(Role, String)>, String, String)>, String> {
    let images = image_paths(r, base)?;
    let user = |q: &str| vec![(Role::User, q.to_string())];
    Ok(match fmt {
        PairFormat::Pairs => {
            let history = match (r.get("conversations"), s(r, "prompt")) {
                (Some(c), _) => llava_turns(c)?,
                (None, Some(p)) => user(p),
                (None, None) => return Err("no `prompt` or `conversations`".into()),
            };
            vec![(
                images,
                history,
                response(r.get("chosen"))?,
                response(r.get("rejected"))?,
            )]
        }
        PairFormat::LlavaRlhf => {
            let mut turns = llava_turns(r.get("conversations").ok_or("no `conversations`")?)?;
            if turns.last().map(|t| t.0) != Some(Role::Assistant) {
                return Err(
                    "LLaVA-RLHF conversations end with the gpt turn the outputs replace".into(),
                );
            }
            turns.pop();
            let (a, b) = (response(r.get("output_1"))?, response(r.get("output_2"))?);
            match r.get("preference").and_then(Value::as_i64) {
                Some(1) => vec![(images, turns, a, b)],
                Some(2) => vec![(images, turns, b, a)],
                other => return Err(format!("`preference` must be 1 or 2, got {other:?}")),
            }
        }
        PairFormat::RlhfV => {
            let text: Value = match r.get("text") {
                Some(Value::String(t)) => serde_json::from_str(t)
                    .map_err(|e| format!("`text` is not a JSON string: {e}"))?,
                Some(v @ Value::Object(_)) => v.clone(),
                _ => r.clone(), // RLAIF-V: flat question/chosen/rejected columns
            };
            let q = s(&text, "question").ok_or("no `question`")?;
            vec![(
                images,
                user(q),
                response(text.get("chosen"))?,
                response(text.get("rejected"))?,
            )]
        }
        PairFormat::Vlfeedback => {
            let q = s(r, "prompt").ok_or("no `prompt`")?;
            vlfeedback_pairs(r)?
                .into_iter()
                .map(|(c, j)| (images.clone(), user(q), c, j))
                .collect()
        }
        PairFormat::Llamafactory => {
            let turns = llava_turns(r.get("conversations").ok_or("no `conversations`")?)?;
            vec![(
                images,
                turns,
                response(r.get("chosen"))?,
                response(r.get("rejected"))?,
            )]
        }
        PairFormat::Trl => {
            let prompt = trl_messages(r.get("prompt").ok_or("no `prompt`")?)?;
            vec![(
                images,
                prompt,
                response(r.get("chosen"))?,
                response(r.get("rejected"))?,
            )]
        }
    })
}

/// Puts `<image>` markers in front of the first user turn when the record has images but no markers (RLHF-V,
/// VLFeedback), then checks markers against images.
fn place_images(
    history: &mut [(Role, String)],
    n_images: usize,
) -> std::result::Result<(), String> {
    let markers: usize = history.iter().map(|t| t.1.matches("<image>").count()).sum();
    if markers == 0 && n_images > 0 {
        let first = history
            .iter_mut()
            .find(|t| t.0 == Role::User)
            .ok_or("no user turn")?;
        first.1 = format!("{}{}", "<image>\n".repeat(n_images), first.1);
    } else if markers != n_images {
        return Err(format!(
            "{markers} <image> marker(s) but {n_images} image(s)"
        ));
    }
    Ok(())
}

/// Loads pairs; bad records come back with their reasons (the stage applies its fail/skip policy).
pub fn load_pairs(
    fmt: PairFormat,
    path: &Path,
    images_dir: Option<&Path>,
) -> Result<(Vec<Pair>, Vec<Bad>)> {
    let base = images_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    let (mut good, mut bad) = (vec![], vec![]);
    for (i, rec) in read_records(path)?.iter().enumerate() {
        let Some(r) = rec.value_or_bad(path, &mut bad) else {
            continue;
        };
        let id = id_of(r, i);
        let parsed = parse(fmt, r, &base).and_then(|ps| {
            let n = ps.len();
            ps.into_iter()
                .enumerate()
                .map(|(k, (images, mut history, chosen, rejected))| {
                    if history.last().map(|t| t.0) != Some(Role::User) {
                        return Err("the prompt must end with a user turn".to_string());
                    }
                    place_images(&mut history, images.len())?;
                    if chosen.trim().is_empty() || rejected.trim().is_empty() {
                        return Err("an empty response".into());
                    }
                    if chosen.trim() == rejected.trim() {
                        return Err("chosen and rejected are the same text".into());
                    }
                    if let Some(p) = images.iter().find(|p| !p.exists()) {
                        return Err(format!("image {} does not exist", p.display()));
                    }
                    Ok(Pair {
                        id: if n > 1 {
                            format!("{id}/{k}")
                        } else {
                            id.clone()
                        },
                        images,
                        history,
                        chosen,
                        rejected,
                    })
                })
                .collect::<std::result::Result<Vec<_>, String>>()
        });
        match parsed {
            Ok(ps) => good.extend(ps),
            Err(reason) => bad.push(Bad::new(
                format!("{}{} ({id})", path.display(), rec.at),
                Kind::Record,
                reason,
            )),
        }
    }
    Ok((good, bad))
}

/// Reads one record per line (or JSON array item) of `path` with `parse(record, image folder, id)`: an item whose
/// images all exist, or a bad record naming file, line and id (a missing image is missing media).
fn read_each<T>(
    path: &Path,
    images_dir: Option<&Path>,
    images_of: impl Fn(&T) -> &[PathBuf],
    parse: impl Fn(&Value, &Path, &str) -> std::result::Result<T, String>,
) -> Result<(Vec<T>, Vec<Bad>)> {
    let base = images_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    let (mut good, mut bad) = (vec![], vec![]);
    for (i, rec) in read_records(path)?.iter().enumerate() {
        let Some(r) = rec.value_or_bad(path, &mut bad) else {
            continue;
        };
        let id = id_of(r, i);
        let at = format!("{}{} ({id})", path.display(), rec.at);
        match parse(r, &base, &id) {
            Ok(item) => match images_of(&item).iter().find(|f| !f.is_file()) {
                Some(f) => bad.push(Bad::new(
                    at,
                    Kind::MissingMedia,
                    format!("image {} does not exist", f.display()),
                )),
                None => good.push(item),
            },
            Err(reason) => bad.push(Bad::new(at, Kind::Record, reason)),
        }
    }
    Ok((good, bad))
}

/// Loads prompts for on-policy stages: `{id, image|images, prompt | conversations, answer?}`; a `pairs` record's
/// `chosen` is its reference answer when it has no `answer`.
pub fn load_prompts(path: &Path, images_dir: Option<&Path>) -> Result<(Vec<PromptItem>, Vec<Bad>)> {
    read_each(
        path,
        images_dir,
        |p: &PromptItem| &p.images,
        |r, base, id| {
            let images = image_paths(r, base)?;
            let mut history = match (r.get("conversations"), s(r, "prompt").or(s(r, "question"))) {
                (Some(c), _) => llava_turns(c)?,
                (None, Some(p)) => vec![(Role::User, p.to_string())],
                _ => return Err("no `prompt` or `conversations`".into()),
            };
            // a preference pair (`pairs` layout) reads as a prompt whose chosen response is the reference answer
            let mut answer = s(r, "answer").or(s(r, "chosen")).map(str::to_string);
            if history.last().map(|t| t.0) == Some(Role::Assistant) {
                // a LLaVA record: its last answer is the reference
                answer = answer.or(history.pop().map(|t| t.1));
            }
            place_images(&mut history, images.len())?;
            Ok(PromptItem {
                id: id.to_string(),
                images,
                history,
                answer,
            })
        },
    )
}

/// Loads unpaired examples for KTO; bad records come back with their reasons. A pair layout gives two examples per
/// pair (`ID/chosen` desirable, `ID/rejected` undesirable), as TRL's `unpair_preference_dataset`.
pub fn load_unpaired(
    fmt: UnpairedFormat,
    path: &Path,
    images_dir: Option<&Path>,
) -> Result<(Vec<Unpaired>, Vec<Bad>)> {
    if let Some(pf) = fmt.paired() {
        let (pairs, bad) = load_pairs(pf, path, images_dir)?;
        let mut out = vec![];
        for p in pairs {
            for (tag, completion, label) in [
                ("chosen", &p.chosen, true),
                ("rejected", &p.rejected, false),
            ] {
                out.push(Unpaired {
                    id: format!("{}/{tag}", p.id),
                    images: p.images.clone(),
                    history: p.history.clone(),
                    completion: completion.clone(),
                    label,
                });
            }
        }
        return Ok((out, bad));
    }
    read_each(
        path,
        images_dir,
        |u: &Unpaired| &u.images,
        |r, base, id| {
            let images = image_paths(r, base)?;
            let mut history = match (r.get("conversations"), r.get("prompt")) {
                (Some(c), _) => llava_turns(c)?,
                (None, Some(Value::String(p))) => vec![(Role::User, p.clone())],
                // TRL's conversational layout: the prompt as a message list
                (None, Some(m @ Value::Array(_))) => trl_messages(m)?,
                _ => return Err("no `prompt` or `conversations`".into()),
            };
            if history.last().map(|t| t.0) != Some(Role::User) {
                return Err("the prompt must end with a user turn".into());
            }
            place_images(&mut history, images.len())?;
            let completion = response(r.get("completion"))
                .map_err(|_| "no `completion` (the response to label)".to_string())?;
            if completion.trim().is_empty() {
                return Err("an empty completion".into());
            }
            let label = match r.get("label") {
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(format!(
                        "`label` must be true (desirable) or false (undesirable), got {other}"
                    ));
                }
                None => return Err("no `label` (true: desirable, false: undesirable)".into()),
            };
            Ok(Unpaired {
                id: id.to_string(),
                images,
                history,
                completion,
                label,
            })
        },
    )
}
