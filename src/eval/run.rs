//! Running one evaluation task: prompts (with M-ICL demonstrations and M-CoT instructions when asked), batched
//! greedy generation, answer extraction and the task's metrics. Used by `mitune eval` and by `kind = "eval"`
//! stages alike.
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::data::{self, Bad, Item, TaskKind};
use super::metrics;
use crate::data::images::ImageProcessor;
use crate::data::sources::Role;
use crate::data::templates;
use crate::data::tokenizer::TextProcessor;
use crate::error::{Error, Result};
use crate::generate::{GenConfig, Prompt, generate_batch, stop_ids};
use crate::recipe::schema::OnBad;
use crate::zoo::mllm::Llava;

pub use crate::recipe::schema::{Split, TaskSpec};

/// How to run: shared by every task of an evaluation.
#[derive(Debug, Clone)]
pub struct Options {
    /// Jinja source of the chat template.
    pub template: String,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub on_bad: OnBad,
}

pub const COT_PROMPT: &str =
    "Think step by step, then give the final answer on its own line as \"Answer: ...\".";

pub fn default_hint(task: TaskKind) -> &'static str {
    match task {
        TaskKind::Vqa | TaskKind::Pope => "Answer the question using a single word or phrase.",
        TaskKind::Mc => "Answer with the option's letter from the given choices directly.",
        TaskKind::Caption => "",
    }
}

/// The user turn for an item: image markers (in front when the file placed none), context, question, lettered
/// options, then the CoT instruction or the answer hint.
pub fn user_text(task: TaskKind, it: &Item, hint: &str, cot: bool) -> String {
    let mut q = String::new();
    if !it.question.contains("<image>") {
        for _ in &it.images {
            q.push_str("<image>\n");
        }
    }
    if !it.context.is_empty() {
        q.push_str(&format!("Context: {}\n", it.context));
    }
    q.push_str(it.question.trim_end());
    if task == TaskKind::Mc {
        for (i, c) in it.choices.iter().enumerate() {
            q.push_str(&format!("\n{}. {c}", metrics::letter(i)));
        }
    }
    if cot {
        q.push('\n');
        q.push_str(COT_PROMPT);
    } else if !hint.is_empty() {
        q.push('\n');
        q.push_str(hint);
    }
    q
}

/// The answer inside a model output: the first line, or with CoT the text after the last "Answer:" /
/// "answer is" (falling back to the last line).
pub fn final_answer(output: &str, cot: bool) -> String {
    let text = output.trim();
    if !cot {
        return text.lines().next().unwrap_or("").trim().to_string();
    }
    let lower = text.to_lowercase();
    let at = ["answer:", "answer is"]
        .iter()
        .filter_map(|m| lower.rfind(m).map(|i| i + m.len()))
        .max();
    let tail = match at {
        Some(i) => &text[i..],
        None => text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or(""),
    };
    let line = tail.trim().lines().next().unwrap_or("").trim();
    line.trim_end_matches('.').trim().to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    pub output: String,
    pub answer: String,
    pub reference: String,
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Category {
    pub n: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub name: String,
    pub task: TaskKind,
    pub split: Split,
    pub shots: usize,
    pub cot: bool,
    pub n: usize,
    pub skipped: Vec<SkippedSample>,
    pub metrics: BTreeMap<String, f64>,
    pub categories: BTreeMap<String, Category>,
    pub seconds: f64,
    pub samples_per_s: f64,
    pub generated_tokens_per_s: f64,
    pub predictions: Vec<Prediction>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SkippedSample {
    pub id: String,
    pub reason: String,
}

impl Report {
    /// The headline number: accuracy, F1 for POPE, CIDEr for captions.
    pub fn primary(&self) -> (&'static str, f64) {
        let key = match self.task {
            TaskKind::Vqa | TaskKind::Mc => "accuracy",
            TaskKind::Pope => "f1",
            TaskKind::Caption => "cider",
        };
        (key, self.metrics.get(key).copied().unwrap_or(0.0))
    }
}

fn bad_samples(spec: &TaskSpec, bad: Vec<Bad>, on_bad: OnBad) -> Result<Vec<SkippedSample>> {
    if let (OnBad::Fail, Some(b)) = (on_bad, bad.first()) {
        return Err(Error::file(
            &spec.data,
            format!(
                "sample {}: {} ({} bad sample(s) in all; fix them, or skip them with on_bad_sample = \"skip\" / --skip-bad)",
                b.id,
                b.reason,
                bad.len()
            ),
        ));
    }
    Ok(bad
        .into_iter()
        .map(|b| SkippedSample {
            id: b.id,
            reason: b.reason,
        })
        .collect())
}

/// Loads, checks and evaluates one task.
pub fn run_task(
    model: &Llava,
    text: &TextProcessor,
    images: &ImageProcessor,
    spec: &TaskSpec,
    opt: &Options,
) -> Result<Report> {
    let (mut items, mut bad) = data::load(spec.task, &spec.data, spec.images.as_deref())?;
    if let Some(l) = spec.limit {
        items.truncate(l);
    }
    items.retain(|it| match data::unscored(spec.task, it) {
        Some(reason) => {
            bad.push(Bad {
                id: it.id.clone(),
                reason,
            });
            false
        }
        None => true,
    });
    let skipped = bad_samples(spec, bad, opt.on_bad)?;
    if items.is_empty() {
        return Err(Error::file(&spec.data, "no sample to evaluate"));
    }
    let pool = match (&spec.demos, spec.shots) {
        (_, 0) => vec![],
        (Some(p), _) => {
            let (d, b) = data::load(spec.task, p, spec.images.as_deref())?;
            if let Some(b) = b.first() {
                return Err(Error::file(
                    p,
                    format!("demonstration {}: {}", b.id, b.reason),
                ));
            }
            d
        }
        (None, _) => items.clone(),
    };
    let hint = spec
        .hint
        .clone()
        .unwrap_or_else(|| default_hint(spec.task).to_string());
    let device = burn::module::Module::devices(model)[0].clone();
    let cfg = GenConfig::greedy(opt.max_new_tokens, stop_ids(model, text));

    let t0 = std::time::Instant::now();
    let mut outputs: Vec<String> = Vec::with_capacity(items.len());
    let mut generated = 0usize;
    for (c, chunk) in items.chunks(opt.batch_size.max(1)).enumerate() {
        let mut prompts = vec![];
        for (j, it) in chunk.iter().enumerate() {
            let index = c * opt.batch_size.max(1) + j;
            let demos = pick_demos(&pool, it, spec.shots, opt.seed, index);
            if demos.len() < spec.shots {
                return Err(Error::input(format!(
                    "{}: {} shots asked but the demonstration pool has only {} usable sample(s) for {}",
                    spec.label(),
                    spec.shots,
                    demos.len(),
                    it.id
                )));
            }
            let mut messages = vec![];
            let mut paths = vec![];
            for d in &demos {
                messages.push((Role::User, user_text(spec.task, d, &hint, false)));
                messages.push((Role::Assistant, d.demo_answer(spec.task)));
                paths.extend(d.images.iter().cloned());
            }
            messages.push((Role::User, user_text(spec.task, it, &hint, spec.cot)));
            paths.extend(it.images.iter().cloned());
            let prompt = templates::prompt(text, &opt.template, &messages)
                .map_err(|m| Error::input(format!("{}: {}: {m}", spec.label(), it.id)))?;
            let (pixels, sizes) = images.batch_sized(&paths, &device)?;
            let ids = text.encode_sized(&prompt, false, &sizes)?;
            prompts.push(Prompt {
                instructions: text.instructions(messages.iter().map(|(_, c)| c.as_str()))?,
                ids,
                pixels,
                sizes,
                videos: None,
                index: index as u64,
            });
        }
        let out = generate_batch(model, prompts, &cfg, None, |_, _| {})?;
        for g in out {
            generated += g.output_ids.len();
            let mut ids = g.output_ids;
            ids.retain(|i| !cfg.eos.contains(i));
            outputs.push(text.decode(&ids));
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mut report = score(spec, &items, &outputs);
    report.skipped = skipped;
    report.seconds = seconds;
    report.samples_per_s = items.len() as f64 / seconds.max(1e-9);
    report.generated_tokens_per_s = generated as f64 / seconds.max(1e-9);
    Ok(report)
}

/// `k` demonstrations for query `index`: a seeded draw from the pool, never the query itself or its image.
fn pick_demos(pool: &[Item], query: &Item, k: usize, seed: u64, index: usize) -> Vec<Item> {
    if k == 0 {
        return vec![];
    }
    let usable: Vec<&Item> = pool
        .iter()
        .filter(|d| d.id != query.id && (d.images.is_empty() || d.images != query.images))
        .collect();
    let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rand::seq::index::sample(&mut rng, usable.len(), k.min(usable.len()))
        .into_iter()
        .map(|i| usable[i].clone())
        .collect()
}

/// Scores model outputs (one per item, in order) with the task's metrics.
pub fn score(spec: &TaskSpec, items: &[Item], outputs: &[String]) -> Report {
    let mut preds = vec![];
    let mut m = BTreeMap::new();
    match spec.task {
        TaskKind::Vqa => {
            for (it, out) in items.iter().zip(outputs) {
                let answer = final_answer(out, spec.cot);
                let s = metrics::vqa_accuracy(&answer, &it.refs);
                preds.push(pred(it, out, answer, it.refs.join(" | "), s));
            }
            m.insert("accuracy".into(), mean(preds.iter().map(|p| p.score)));
        }
        TaskKind::Mc => {
            let mut invalid = 0;
            for (it, out) in items.iter().zip(outputs) {
                let answer = final_answer(out, spec.cot);
                let chosen = metrics::extract_choice(&answer, &it.choices);
                invalid += usize::from(chosen.is_none());
                let right = it.answer.unwrap_or(usize::MAX);
                let s = f64::from(u8::from(chosen == Some(right)));
                let reference = format!(
                    "{}. {}",
                    metrics::letter(right),
                    it.choices.get(right).map_or("", String::as_str)
                );
                preds.push(pred(it, out, answer, reference, s));
            }
            m.insert("accuracy".into(), mean(preds.iter().map(|p| p.score)));
            m.insert("invalid".into(), invalid as f64 / items.len() as f64);
        }
        TaskKind::Pope => {
            let (mut yes, mut labels) = (vec![], vec![]);
            for (it, out) in items.iter().zip(outputs) {
                let answer = final_answer(out, spec.cot);
                let y = metrics::pope_is_yes(&answer);
                let l = it.label == Some(true);
                yes.push(y);
                labels.push(l);
                let reference = if l { "yes" } else { "no" }.to_string();
                preds.push(pred(
                    it,
                    out,
                    answer,
                    reference,
                    f64::from(u8::from(y == l)),
                ));
            }
            let s = metrics::pope_scores(&yes, &labels);
            m.insert("accuracy".into(), s.accuracy);
            m.insert("precision".into(), s.precision);
            m.insert("recall".into(), s.recall);
            m.insert("f1".into(), s.f1);
            m.insert("yes_ratio".into(), s.yes_ratio);
            m.insert("yes_to_absent".into(), s.yes_to_absent);
        }
        TaskKind::Caption => {
            let tok = |s: &str| metrics::caption_tokens(s).join(" ");
            let answers: Vec<String> = outputs.iter().map(|o| final_answer(o, spec.cot)).collect();
            let res: Vec<String> = answers.iter().map(|a| tok(a)).collect();
            let gts: Vec<Vec<String>> = items
                .iter()
                .map(|it| it.refs.iter().map(|r| tok(r)).collect())
                .collect();
            let bleu = metrics::bleu4(&res, &gts);
            let (cider, per) = metrics::cider_d(&res, &gts);
            for (i, it) in items.iter().enumerate() {
                preds.push(pred(
                    it,
                    &outputs[i],
                    answers[i].clone(),
                    it.refs.join(" | "),
                    per[i],
                ));
            }
            m.insert("bleu1".into(), bleu[0]);
            m.insert("bleu4".into(), bleu[3]);
            m.insert("cider".into(), cider);
        }
    }
    let mut categories: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for p in &preds {
        if let Some(c) = &p.category {
            let e = categories.entry(c.clone()).or_default();
            e.0 += 1;
            e.1 += p.score;
        }
    }
    Report {
        name: spec.label(),
        task: spec.task,
        split: spec.split,
        shots: spec.shots,
        cot: spec.cot,
        n: items.len(),
        skipped: vec![],
        metrics: m,
        categories: categories
            .into_iter()
            .map(|(k, (n, s))| {
                (
                    k,
                    Category {
                        n,
                        accuracy: s / n as f64,
                    },
                )
            })
            .collect(),
        seconds: 0.0,
        samples_per_s: 0.0,
        generated_tokens_per_s: 0.0,
        predictions: preds,
    }
}

fn pred(it: &Item, output: &str, answer: String, reference: String, score: f64) -> Prediction {
    Prediction {
        id: it.id.clone(),
        output: output.to_string(),
        answer,
        reference,
        score,
        category: it.category.clone(),
    }
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

/// The terminal table: one row per task, its metrics in percent (CIDEr and BLEU as they are).
pub fn table(reports: &[Report]) -> String {
    let mut s = String::new();
    for r in reports {
        let ms: Vec<String> = r
            .metrics
            .iter()
            .map(|(k, v)| {
                if matches!(k.as_str(), "cider" | "bleu1" | "bleu4") {
                    format!("{k} {v:.3}")
                } else {
                    format!("{k} {:.1}", 100.0 * v)
                }
            })
            .collect();
        s.push_str(&format!(
            "{:<24} n={:<5} {}  ({:.1} samples/s{}{})\n",
            r.name,
            r.n,
            ms.join("  "),
            r.samples_per_s,
            if r.shots > 0 {
                format!(", {}-shot", r.shots)
            } else {
                String::new()
            },
            if r.cot { ", cot" } else { "" },
        ));
        if r.categories.len() > 1 {
            for (k, c) in &r.categories {
                s.push_str(&format!(
                    "    {k:<20} n={:<5} {:.1}\n",
                    c.n,
                    100.0 * c.accuracy
                ));
            }
        }
        if !r.skipped.is_empty() {
            s.push_str(&format!(
                "    skipped {} sample(s), first: {}: {}\n",
                r.skipped.len(),
                r.skipped[0].id,
                r.skipped[0].reason
            ));
        }
    }
    s
}
