//! Chat templates and the loss mask. Built-in templates are jinja strings (LLaVA's `plain`, `vicuna_v1`,
//! `llama_2`, and `chatml`), rendered by the same minijinja path as a checkpoint's own `chat_template`, and written
//! into exported checkpoints so `generate` and transformers prompt the model exactly as it was trained.
//!
//! The mask is derived the same way for every template (never per-template offsets, LLaVA's most reported bug):
//! assistant turn i spans from the end of `render(messages[..i], add_generation_prompt)` to the end of
//! `render(messages[..=i])`; a token is supervised when it starts inside such a span. The result is checked by
//! decoding the supervised tokens back to the assistant text.
use std::path::PathBuf;

use super::contract::{Kind, Reject};
use super::sources::{Role, Sample};
use super::tokenizer::TextProcessor;
use super::video::Clip;
use crate::recipe::schema::Template;
use crate::zoo::sizing::Sizing;

pub const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

const PLAIN: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{% if '<image>' in m['content'] %}<image>{% endif %}{% elif m['role'] == 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}";

const VICUNA_V1: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.{% endif %} {% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}";

const LLAMA_2: &str = "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% else %}{% set sys = 'You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.' %}{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {% if loop.first or (loop.index0 == 1 and messages[0]['role'] == 'system') %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n{% endif %}{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}";

const CHATML: &str = "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The jinja source of a template (`tokenizer` = the checkpoint's own).
pub fn source(template: Template, tp: &TextProcessor) -> std::result::Result<String, String> {
    Ok(match template {
        Template::Plain => PLAIN.into(),
        Template::VicunaV1 => VICUNA_V1.into(),
        Template::Llama2 => LLAMA_2.into(),
        Template::Chatml => CHATML.into(),
        Template::Tokenizer => tp.chat_template.clone().ok_or_else(|| {
            format!(
                "template = \"tokenizer\" but {} has no chat template; pick plain, vicuna_v1, llama_2 or chatml",
                tp.dir().display()
            )
        })?,
    })
}

/// The template a training stage renders with: as `source`, except that `tokenizer` means the LLM's own template
/// even when the model comes from an earlier stage's directory (whose `chat_template.jinja` is the template that
/// stage trained with, e.g. `plain`).
pub fn training_source(
    template: Template,
    tp: &TextProcessor,
) -> std::result::Result<String, String> {
    match (template, &tp.base_chat_template) {
        (Template::Tokenizer, Some(base)) => Ok(base.clone()),
        _ => source(template, tp),
    }
}

/// A sample ready for the model.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub index: usize,
    /// [t] token ids with image placeholders expanded.
    pub ids: Vec<i64>,
    /// [t] true where the token is a training target.
    pub labels: Vec<bool>,
    pub images: Vec<PathBuf>,
    /// Native resolution: each image's patch grid under its source's pixel budget, fixed when the dataset was
    /// built (empty for other layouts).
    pub image_grids: Vec<[usize; 3]>,
    /// Clips, in video-marker order: frames sampled and grids fixed when the dataset was built.
    pub videos: Vec<Clip>,
    /// One instruction per image (the connector's own token ids: the text of the turn that holds the image,
    /// markers removed) when the model's connector reads one (InstructBLIP); empty otherwise.
    pub instructions: Vec<Vec<i64>>,
}

impl Encoded {
    pub fn supervised(&self) -> usize {
        self.labels.iter().filter(|&&l| l).count()
    }

    /// The target token ids, in order.
    pub fn supervised_ids(&self) -> Vec<i64> {
        self.ids
            .iter()
            .zip(&self.labels)
            .filter(|(_, l)| **l)
            .map(|(i, _)| *i)
            .collect()
    }
}

fn pairs(messages: &[(Role, String)], marker: &str) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|(r, c)| (r.as_str().to_string(), c.replace("<image>", marker)))
        .collect()
}

/// Renders the prompt for generation: every message, then the assistant generation prompt.
pub fn prompt(
    tp: &TextProcessor,
    src: &str,
    messages: &[(Role, String)],
) -> std::result::Result<String, String> {
    tp.render_template(src, &pairs(messages, &tp.image_token), true)
        .map_err(|e| e.to_string())
}

/// Renders, tokenizes and masks one sample; errors are the reason the sample is bad.
pub fn encode(
    tp: &TextProcessor,
    src: &str,
    sample: &Sample,
    index: usize,
    max_len: usize,
) -> std::result::Result<Encoded, Reject> {
    encode_with(tp, src, sample, index, max_len, false)
}

/// As `encode`, but only the last assistant turn is supervised (the response a preference pair compares; the
/// earlier turns are context).
pub fn encode_last(
    tp: &TextProcessor,
    src: &str,
    sample: &Sample,
    index: usize,
    max_len: usize,
) -> std::result::Result<Encoded, Reject> {
    encode_with(tp, src, sample, index, max_len, true)
}

fn encode_with(
    tp: &TextProcessor,
    src: &str,
    sample: &Sample,
    index: usize,
    max_len: usize,
    last_only: bool,
) -> std::result::Result<Encoded, Reject> {
    let tpl = |reason: String| Reject::new(Kind::Template, reason);
    let markers_err = |reason: String| Reject::new(Kind::Markers, reason);
    let (text, spans, answers) = if let Some(raw) = &sample.raw_text {
        // Causal LM: BOS + text + EOS, all supervised.
        let bos = tp.bos_token.clone().unwrap_or_default();
        let eos = tp.eos_token.clone().unwrap_or_default();
        let text = format!("{bos}{raw}{eos}");
        (
            text.clone(),
            vec![(bos.len(), text.len())],
            vec![raw.clone()],
        )
    } else {
        let msgs = pairs(&sample.messages, &tp.image_token);
        let render = |m: &[(String, String)], gen_prompt: bool| {
            tp.render_template(src, m, gen_prompt)
                .map_err(|e| tpl(e.to_string()))
        };
        // checked on the raw record, before a template could collapse or drop a marker
        let (images, videos) = raw_markers(tp, &sample.messages);
        if images != sample.images.len() || videos != sample.videos.len() {
            return Err(markers_err(format!(
                "the record has {images} image marker(s) for {} image(s) and {videos} video marker(s) for {} \
                 clip(s)",
                sample.images.len(),
                sample.videos.len()
            )));
        }
        let full = render(&msgs, false)?;
        let mut spans = vec![];
        let mut answers = vec![];
        for (i, (role, content)) in sample.messages.iter().enumerate() {
            if *role != Role::Assistant {
                continue;
            }
            let before = render(&msgs[..i], true)?;
            let upto = render(&msgs[..=i], false)?;
            if content.trim().is_empty() {
                return Err(Reject::new(
                    Kind::EmptyAnswer,
                    format!(
                        "assistant turn {i} is empty: it would teach the model to stop at once"
                    ),
                ));
            }
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err(tpl(format!(
                    "the template does not render turn {i} as a prefix-stable span (render(messages[..{i}], add_generation_prompt) is not a prefix of the rendered conversation); the loss mask cannot be derived"
                )));
            }
            spans.push((before.len(), upto.len()));
            answers.push(content.clone());
        }
        if spans.is_empty() {
            return Err(Reject::new(
                Kind::Record,
                "no assistant turn: nothing to learn from",
            ));
        }
        if last_only {
            spans.drain(..spans.len() - 1);
            answers.drain(..answers.len() - 1);
        }
        (full, spans, answers)
    };
    let markers = tp.markers(&text);
    if markers != sample.images.len() {
        return Err(markers_err(format!(
            "{} `<image>` marker(s) after templating but {} image(s) (the template dropped or repeated a marker)",
            markers,
            sample.images.len()
        )));
    }
    let video_markers = tp.video_markers(&text);
    if video_markers != sample.videos.len() {
        return Err(if tp.video_token.is_none() && !sample.videos.is_empty() {
            Reject::new(
                Kind::Media,
                "the sample has a video but this model does not read videos (only Qwen2-VL / Qwen2.5-VL \
                 checkpoints do)",
            )
        } else {
            markers_err(format!(
                "{video_markers} `<video>` marker(s) after templating but {} clip(s)",
                sample.videos.len()
            ))
        });
    }
    // Each clip's frames are sampled and its grid fixed here (directory listing and one frame header), so its
    // placeholder count is known before training.
    let clips: Vec<Clip> = match &tp.sizing {
        Some(Sizing::Native(n)) => sample
            .videos
            .iter()
            .map(|v| v.open(n))
            .collect::<crate::error::Result<_>>()
            .map_err(|e| Reject::new(Kind::Media, e.to_string()))?,
        _ => vec![],
    };
    let (ids, offsets) = tp.encode_offsets(&text).map_err(|e| tpl(e.to_string()))?;
    // A model whose image token count depends on the image's size (AnyRes) reads each image's header here, so
    // the count is fixed when the dataset is built, never found wrong at a training step.
    let sizes = if tp.sizing.is_some() {
        crate::data::images::ImageProcessor::sizes(&sample.images)
            .map_err(|e| Reject::new(Kind::UnreadableMedia, e.to_string()))?
    } else {
        vec![]
    };
    let counts = tp
        .image_counts(markers, &sizes)
        .map_err(|e| Reject::new(Kind::Media, e.to_string()))?;
    let image_grids = match &tp.sizing {
        Some(Sizing::Native(n)) => sizes
            .iter()
            .map(|&[h, w]| n.grid(h, w))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Reject::new(Kind::Media, e))?,
        _ => vec![],
    };
    let video_id = tp.video_token.as_ref().map(|v| v.1);
    let (mut out_ids, mut labels) = (vec![], vec![]);
    let mut span_tokens: Vec<Vec<i64>> = vec![vec![]; spans.len()];
    let (mut found, mut found_videos) = (0, 0);
    for (&id, &(start, _)) in ids.iter().zip(&offsets) {
        if id == tp.image_token_id {
            let per = counts.get(found).copied().unwrap_or(0);
            found += 1;
            out_ids.extend(std::iter::repeat_n(id, per));
            labels.extend(std::iter::repeat_n(false, per));
            continue;
        }
        if Some(id) == video_id {
            let per = clips.get(found_videos).map_or(0, |c| tp_tokens(tp, c.grid));
            found_videos += 1;
            out_ids.extend(std::iter::repeat_n(id, per));
            labels.extend(std::iter::repeat_n(false, per));
            continue;
        }
        let span = spans.iter().position(|&(a, b)| start >= a && start < b);
        if let Some(k) = span {
            span_tokens[k].push(id);
        }
        out_ids.push(id);
        labels.push(span.is_some());
    }
    if found != markers {
        return Err(tpl(format!(
            "{markers} `{}` marker(s) but the tokenizer produced {found} image token(s): the marker must be a special token",
            tp.image_token
        )));
    }
    if found_videos != video_markers {
        return Err(tpl(format!(
            "{video_markers} video marker(s) but the tokenizer produced {found_videos} video token(s): the marker must be a special token"
        )));
    }
    // The supervised tokens of each turn must decode back to that turn's text (catches template/tokenizer
    // disagreement before it silently trains on the wrong tokens).
    for (k, toks) in span_tokens.iter().enumerate() {
        let got = tp.decode(toks);
        if got.trim() != answers[k].trim() {
            return Err(tpl(format!(
                "assistant turn {k}: the supervised tokens decode to {:?}, not the answer {:?} (template and tokenizer disagree)",
                got.trim(),
                answers[k].trim()
            )));
        }
    }
    if out_ids.len() > max_len {
        if let Some(last) = out_ids
            .iter()
            .rposition(|&t| t == tp.image_token_id || Some(t) == video_id)
            && last >= max_len
        {
            let (what, knob) = if out_ids[last] == tp.image_token_id {
                ("image", "max_pixels")
            } else {
                ("video", "max_frames / video_max_pixels")
            };
            return Err(Reject::new(
                Kind::TooLong,
                format!(
                    "{} tokens after image expansion: truncating to max_len {max_len} would cut {what} tokens; \
                     raise max_len, lower {knob}, or drop the sample",
                    out_ids.len()
                ),
            ));
        }
        out_ids.truncate(max_len);
        labels.truncate(max_len);
    }
    // Position 0 is never a target (nothing predicts it).
    if labels.iter().skip(1).all(|l| !l) {
        return Err(Reject::new(
            Kind::TooLong,
            format!("no supervised token left within max_len {max_len}"),
        ));
    }
    // InstructBLIP's Q-Former reads the instruction each image comes with: the turn holding its marker
    let instructions = tp
        .instructions(sample.messages.iter().map(|(_, c)| c.as_str()))
        .map_err(|e| tpl(e.to_string()))?;
    Ok(Encoded {
        index,
        ids: out_ids,
        labels,
        images: sample.images.clone(),
        image_grids,
        videos: clips,
        instructions,
    })
}

/// Image and video markers in a record's messages as written: LLaVA's `<image>` and the model's own image token,
/// `<video>` and the model's own video token.
fn raw_markers(tp: &TextProcessor, messages: &[(Role, String)]) -> (usize, usize) {
    let mut images = 0;
    let mut videos = 0;
    for (_, c) in messages {
        images += c.matches("<image>").count();
        if tp.image_token != "<image>" {
            images += c.matches(tp.image_token.as_str()).count();
        }
        videos += c.matches(super::tokenizer::VIDEO_MARKER).count();
        if let Some((v, _)) = &tp.video_token {
            videos += c.matches(v.as_str()).count();
        }
    }
    (images, videos)
}

/// Placeholders of a clip's grid.
fn tp_tokens(tp: &TextProcessor, grid: [usize; 3]) -> usize {
    match &tp.sizing {
        Some(Sizing::Native(n)) => n.grid_tokens(grid),
        _ => 0,
    }
}
