//! The data contract: what makes a sample bad, and what happens to bad samples. Every loader (instruction data,
//! preference pairs, RL prompts) reports its rejects as [`Bad`] records — where (file:index and the record's id),
//! which kind of problem, the reason — and [`settle`] applies the stage's `on_bad_sample` policy the same way for
//! all: every bad sample is written to a JSONL file it names, a summary groups them by kind (count, first ids, what
//! to do), `fail` stops before the first step naming them, `skip` drops them and says so.
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::recipe::schema::OnBad;

/// What is wrong with a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The record's shape: missing or mistyped fields, unknown or misordered roles.
    Record,
    /// `<image>` / `<video>` markers and media disagree (before or after templating).
    Markers,
    /// A media file (image, clip frame) that does not exist.
    MissingMedia,
    /// A media file that cannot be read or decoded (truncated, not an image, unsupported format).
    UnreadableMedia,
    /// A relative media path that leads outside the dataset's image folder.
    OutsideRoot,
    /// An empty assistant answer (it would teach the model to stop at once).
    EmptyAnswer,
    /// The chat template or tokenizer cannot render or mask the sample.
    Template,
    /// The sample does not fit `max_len` without cutting media tokens or every target.
    TooLong,
    /// Media the model cannot take (e.g. a clip for a model without video, a clip of no frames).
    Media,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Record => "record",
            Kind::Markers => "markers",
            Kind::MissingMedia => "missing media",
            Kind::UnreadableMedia => "unreadable media",
            Kind::OutsideRoot => "outside the image folder",
            Kind::EmptyAnswer => "empty answer",
            Kind::Template => "template",
            Kind::TooLong => "too long",
            Kind::Media => "media",
        }
    }

    /// What the user does about it.
    pub fn advice(self) -> &'static str {
        match self {
            Kind::Record => "fix the record's fields (see the reason)",
            Kind::Markers => "give each <image> / <video> marker exactly one file, in order",
            Kind::MissingMedia => "check the source's `images` folder and the paths in the records",
            Kind::UnreadableMedia => "re-encode or remove the file (PNG and JPEG are read)",
            Kind::OutsideRoot => {
                "keep media under the source's `images` folder (no `..` or symlink out of it), or give absolute paths"
            }
            Kind::EmptyAnswer => "drop the turn or write its answer",
            Kind::Template => "pick a template that renders the conversation (see the reason)",
            Kind::TooLong => "raise max_len, lower max_pixels / max_frames, or shorten the sample",
            Kind::Media => "see the reason",
        }
    }
}

/// A rejected sample.
#[derive(Debug, Clone, Serialize)]
pub struct Bad {
    /// Where: `file:index (record id)`.
    pub id: String,
    pub kind: Kind,
    pub reason: String,
}

impl Bad {
    pub fn new(id: impl Into<String>, kind: Kind, reason: impl Into<String>) -> Self {
        Bad {
            id: id.into(),
            kind,
            reason: reason.into(),
        }
    }
}

/// A reject from the encoder (templates), typed so reports group it.
#[derive(Debug, Clone)]
pub struct Reject {
    pub kind: Kind,
    pub reason: String,
}

impl Reject {
    pub fn new(kind: Kind, reason: impl Into<String>) -> Self {
        Reject {
            kind,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Bad samples grouped by kind, for messages: per kind its count, first ids and reason, and what to do.
pub fn summary(bad: &[Bad], what: &str) -> String {
    let mut groups: BTreeMap<Kind, Vec<&Bad>> = BTreeMap::new();
    for b in bad {
        groups.entry(b.kind).or_default().push(b);
    }
    let mut out = format!("{} bad {what}(s):", bad.len());
    for (kind, list) in groups {
        let first: Vec<String> = list
            .iter()
            .take(3)
            .map(|b| format!("{}: {}", b.id, b.reason))
            .collect();
        out.push_str(&format!(
            "\n  {} × {} — {}; e.g. {}{}",
            list.len(),
            kind.as_str(),
            kind.advice(),
            first.join("; "),
            if list.len() > 3 { "; …" } else { "" }
        ));
    }
    out
}

/// Applies the policy to a loader's rejects: every one is written to `list` (JSONL: id, kind, reason); `fail`
/// stops here with the grouped summary, `skip` prints it and goes on. No bad samples: nothing is written.
pub fn settle(bad: &[Bad], policy: OnBad, list: &Path, key: &str, what: &str) -> Result<()> {
    if bad.is_empty() {
        return Ok(());
    }
    if let Some(dir) = list.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let lines: String = bad
        .iter()
        .map(|b| serde_json::to_string(b).unwrap_or_default() + "\n")
        .collect();
    // data parallel: every rank finds the same bad samples; rank 0 lists them
    if crate::dist::writer() {
        crate::error::write_atomic(list, lines.as_bytes())?;
    }
    let s = summary(bad, what);
    match policy {
        OnBad::Fail => Err(Error::input(format!(
            "{key}: {s}\n  every one is listed in {}; fix them, or set on_bad_sample = \"skip\" to train without them",
            list.display()
        ))),
        OnBad::Skip => {
            eprintln!(
                "{key}: skipping {s}\n  every one is listed in {}",
                list.display()
            );
            Ok(())
        }
    }
}

/// `settle` for samples found bad during training (a media file changed on disk since the checks): `fail` stops the
/// run naming them (the last checkpoint stays the resume point), `skip` appends them to `list` and goes on.
pub fn settle_late(bad: &[Bad], policy: OnBad, list: &Path, key: &str) -> Result<()> {
    if bad.is_empty() {
        return Ok(());
    }
    let s = summary(bad, "sample");
    if policy == OnBad::Fail {
        return Err(Error::input(format!(
            "{key}: {s}\n  fix or remove the files and resume (--resume), or set on_bad_sample = \"skip\""
        )));
    }
    use std::io::Write;
    let lines: String = bad
        .iter()
        .map(|b| serde_json::to_string(b).unwrap_or_default() + "\n")
        .collect();
    if crate::dist::writer() {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(list)
            .and_then(|mut f| f.write_all(lines.as_bytes()))
            .map_err(|source| Error::Io {
                path: list.to_path_buf(),
                source,
            })?;
    }
    eprintln!("{key}: skipping {s}\n  listed in {}", list.display());
    Ok(())
}
