//! Text side of a HuggingFace processor: `tokenizer.json` (tokenizers crate, offline), special tokens from
//! `tokenizer_config.json`, the chat template (`chat_template.jinja`, `chat_template.json`, or the
//! `chat_template` key of tokenizer/processor config) rendered with minijinja, and LLaVA's `<image>` expansion:
//! each marker becomes `tokens_per_image` placeholder ids, as `LlavaProcessor` does.
use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, read_json, read_string};
use crate::zoo::mllm::LlavaSpec;
use crate::zoo::sizing::Sizing;

/// Files that travel with a checkpoint (copied when mitune saves a model).
pub const ASSET_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
];

pub const BASE_TEMPLATE_FILE: &str = "base_chat_template.jinja";

/// Copies a connector's own tokenizer folder (`qformer_tokenizer/`) from `from` to `out`, when there is one
/// (conversions of a checkpoint directory; trained models write `TextProcessor::save_files`).
pub fn copy_qformer_tokenizer(from: &Path, out: &Path) -> Result<()> {
    let src = from.join("qformer_tokenizer");
    if !src.is_dir() || from == out {
        return Ok(());
    }
    let dst = out.join("qformer_tokenizer");
    std::fs::create_dir_all(&dst).map_err(|source| Error::Io {
        path: dst.clone(),
        source,
    })?;
    let entries = std::fs::read_dir(&src).map_err(|source| Error::Io {
        path: src.clone(),
        source,
    })?;
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(entry.file_name()))
                .map_err(|source| Error::Io { path: p, source })?;
        }
    }
    Ok(())
}

/// The tokenizer's files every saved model carries (beside `qformer_tokenizer/*`, a connector's own).
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The tokenizer's files as they were when it loaded (path relative to its folder, bytes): saves write these, not
/// copies of the folder, which may be gone by then (a run's old checkpoints are pruned while a stage that resumed
/// from one still holds its tokenizer).
fn read_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = vec![];
    for f in TOKENIZER_FILES {
        let p = dir.join(f);
        if p.exists() {
            out.push((PathBuf::from(f), crate::error::read(&p)?));
        }
    }
    let q = dir.join("qformer_tokenizer");
    if q.is_dir() {
        let entries = std::fs::read_dir(&q).map_err(|source| Error::Io {
            path: q.clone(),
            source,
        })?;
        let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names.into_iter().filter(|p| p.is_file()) {
            let rel = Path::new("qformer_tokenizer").join(p.file_name().unwrap_or_default());
            out.push((rel, crate::error::read(&p)?));
        }
    }
    Ok(out)
}

#[derive(Clone)]
pub struct TextProcessor {
    tok: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub eos_token_id: Option<i64>,
    pub chat_template: Option<String>,
    /// The LLM's own template, which `template = "tokenizer"` means in training stages: a stage model's
    /// `chat_template.jinja` is the template it was trained with (e.g. `plain` after alignment), so exports keep
    /// the original beside it as `base_chat_template.jinja`.
    pub base_chat_template: Option<String>,
    pub image_token: String,
    pub image_token_id: i64,
    pub tokens_per_image: usize,
    /// Each image's placeholder count follows from its size (AnyRes, native resolution; from the model's spec).
    pub sizing: Option<Sizing>,
    /// Tokens that wrap every image's placeholders (`<|vision_start|>`, `<|vision_end|>`): templates without typed
    /// content parts and raw prompts get them around each marker.
    pub image_wrap: Option<(String, String)>,
    /// The video placeholder (`<|video_pad|>`) and its id, for a model that reads clips; `<video>` in a prompt or
    /// a dataset stands for it.
    pub video_token: Option<(String, i64)>,
    /// A connector's own tokenizer (InstructBLIP's Q-Former BERT tokenizer, `qformer_tokenizer/`).
    pub qformer: Option<tokenizers::Tokenizer>,
    dir: PathBuf,
    files: std::sync::Arc<Vec<(PathBuf, Vec<u8>)>>,
}

/// Each `token` of `ids` repeated as many times as its entry of `counts`, in order (0 past the end).
fn expand_token(ids: &[i64], token: i64, counts: &[usize]) -> Vec<i64> {
    let mut out = Vec::with_capacity(ids.len() + counts.iter().sum::<usize>());
    let mut k = 0;
    for &id in ids {
        if id == token {
            out.extend(std::iter::repeat_n(id, counts.get(k).copied().unwrap_or(0)));
            k += 1;
        } else {
            out.push(id);
        }
    }
    out
}

/// The marker of a clip in datasets and prompts (LLaMA-Factory's `videos` column, LLaVA-Video's `video` field).
pub const VIDEO_MARKER: &str = "<video>";

/// A message's content as typed parts: text, `{"type": "image"}` at each image token, `{"type": "video"}` at each
/// video token, in order (as llava-hf and Qwen templates iterate them).
fn typed_parts(content: &str, image: &str, video: Option<&str>) -> Vec<Value> {
    let mut parts = vec![];
    let mut rest = content;
    loop {
        let next_image = rest.find(image).map(|i| (i, image, "image"));
        let next_video = video
            .filter(|v| !v.is_empty())
            .and_then(|v| rest.find(v).map(|i| (i, v, "video")));
        let next = match (next_image, next_video) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        let Some((at, token, kind)) = next else {
            if !rest.is_empty() {
                parts.push(serde_json::json!({"type": "text", "text": rest}));
            }
            return parts;
        };
        if at > 0 {
            parts.push(serde_json::json!({"type": "text", "text": &rest[..at]}));
        }
        parts.push(serde_json::json!({"type": kind}));
        rest = &rest[at + token.len()..];
    }
}

fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextProcessor {
    pub fn load(dir: &Path, image_token_id: i64, tokens_per_image: usize) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::file(
                &tok_path,
                "missing: mitune needs the fast tokenizer file (save it with transformers' tokenizer.save_pretrained)",
            ));
        }
        let tok = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::file(&tok_path, format!("cannot read tokenizer: {e}")))?;
        let cfg: Value = {
            let p = dir.join("tokenizer_config.json");
            if p.exists() {
                read_json(&p)?
            } else {
                Value::Null
            }
        };
        let proc_cfg: Value = {
            let p = dir.join("processor_config.json");
            if p.exists() {
                read_json(&p)?
            } else {
                Value::Null
            }
        };
        let chat_template = Self::find_template(dir, &cfg, &proc_cfg)?;
        let base = dir.join(BASE_TEMPLATE_FILE);
        let base_chat_template = if base.exists() {
            Some(read_string(&base)?)
        } else {
            chat_template.clone()
        };
        let image_token = token_str(cfg.get("image_token"))
            .or_else(|| token_str(proc_cfg.get("image_token")))
            .or_else(|| tok.id_to_token(image_token_id as u32))
            .unwrap_or_else(|| "<image>".into());
        let eos_token = token_str(cfg.get("eos_token"));
        let eos_token_id = eos_token
            .as_ref()
            .and_then(|t| tok.token_to_id(t))
            .map(i64::from);
        let qpath = dir.join("qformer_tokenizer").join("tokenizer.json");
        let qformer = if qpath.exists() {
            Some(
                tokenizers::Tokenizer::from_file(&qpath)
                    .map_err(|e| Error::file(&qpath, format!("cannot read tokenizer: {e}")))?,
            )
        } else {
            None
        };
        Ok(TextProcessor {
            qformer,
            bos_token: token_str(cfg.get("bos_token")),
            eos_token,
            eos_token_id,
            chat_template,
            base_chat_template,
            image_token,
            image_token_id,
            tokens_per_image,
            sizing: None,
            image_wrap: None,
            video_token: None,
            tok,
            dir: dir.to_path_buf(),
            files: std::sync::Arc::new(read_files(dir)?),
        })
    }

    fn find_template(dir: &Path, cfg: &Value, proc_cfg: &Value) -> Result<Option<String>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            return Ok(Some(read_string(&jinja)?));
        }
        let json = dir.join("chat_template.json");
        if json.exists() {
            let v: Value = read_json(&json)?;
            if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
                return Ok(Some(t.to_string()));
            }
        }
        Ok(cfg
            .get("chat_template")
            .or_else(|| proc_cfg.get("chat_template"))
            .and_then(|t| t.as_str())
            .map(str::to_string))
    }

    /// InstructBLIP's processor (`InstructBlipProcessor`): every image's placeholders first — before BOS — then
    /// the prompt tokenized as usual (markers removed), and the same prompt through the Q-Former's tokenizer as
    /// each image's instruction. `chat`: the prompt goes through the chat template instead of raw.
    /// Returns (ids, one instruction per image).
    pub fn encode_images_first(
        &self,
        prompt: &str,
        images: usize,
        chat: bool,
    ) -> Result<(Vec<i64>, Vec<Vec<i64>>)> {
        let text = prompt.replace(self.image_token.as_str(), "");
        let body = if chat {
            self.encode_chat(&text)?
        } else {
            self.encode(&text, true)?
        };
        let mut ids = vec![self.image_token_id; images * self.tokens_per_image];
        ids.extend(body);
        let instruction = self.qformer_ids(&text)?;
        Ok((ids, vec![instruction; images]))
    }

    /// One instruction per image for a connector that reads one (InstructBLIP): the text of the turn holding each
    /// `<image>` marker, markers removed, through the connector's tokenizer; empty when the model has none.
    pub fn instructions<'a>(
        &self,
        turns: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Vec<i64>>> {
        let mut out = vec![];
        if self.qformer.is_none() {
            return Ok(out);
        }
        for turn in turns {
            let text = turn.replace(self.image_token.as_str(), "");
            for _ in 0..self.markers(turn) {
                out.push(self.qformer_ids(text.trim())?);
            }
        }
        Ok(out)
    }

    /// `text` through the connector's own tokenizer, special tokens added ([CLS] … [SEP]).
    pub fn qformer_ids(&self, text: &str) -> Result<Vec<i64>> {
        let q = self.qformer.as_ref().ok_or_else(|| {
            Error::file(
                self.dir.join("qformer_tokenizer"),
                "missing: this model's connector reads the instruction with its own tokenizer (save the processor \
                 with transformers' InstructBlipProcessor.save_pretrained)",
            )
        })?;
        let enc = q
            .encode(text, true)
            .map_err(|e| Error::input(format!("Q-Former tokenizer: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Image markers in a prompt: the model's image token, and LLaVA's `<image>` where the model's differs (it
    /// stands for the model's marker, see `encode_sized`).
    pub fn markers(&self, text: &str) -> usize {
        let own = text.matches(self.image_token.as_str()).count();
        if self.aliases_llava_marker() {
            own + text.matches("<image>").count()
        } else {
            own
        }
    }

    /// Placeholders for each image, in marker order: `tokens_per_image` each, or the sizing's count for each
    /// image's original (height, width) in `sizes`.
    pub fn image_counts(&self, markers: usize, sizes: &[[u32; 2]]) -> Result<Vec<usize>> {
        let Some(s) = &self.sizing else {
            return Ok(vec![self.tokens_per_image; markers]);
        };
        if sizes.len() != markers {
            return Err(Error::input(format!(
                "{markers} image marker(s) but {} image size(s): this model's image token count depends on each \
                 image's size, so every marker needs its image",
                sizes.len()
            )));
        }
        // one encode call is one sample: LLaVA-OneVision tiles an image only when it is the sample's only one
        let alone = sizes.len() == 1;
        sizes
            .iter()
            .map(|&[h, w]| s.tokens(h, w, alone).map_err(Error::input))
            .collect()
    }

    /// Replaces each image token of `ids` by that image's placeholders (`counts`, in order).
    pub fn expand(&self, ids: &[i64], counts: &[usize]) -> Vec<i64> {
        expand_token(ids, self.image_token_id, counts)
    }

    /// Tokenizes `text`; with `add_special` the tokenizer's post-processor adds BOS etc. exactly as transformers
    /// does for a raw prompt. Each image marker is then expanded to `tokens_per_image` placeholders (a model whose
    /// count depends on the image's size needs `encode_sized`).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        self.encode_sized(text, add_special, &[])
    }

    /// Takes the model's image geometry and image-wrapping tokens (what `configure` of the image processor
    /// mirrors).
    pub fn configure(&mut self, spec: &LlavaSpec) {
        self.sizing = spec.sizing();
        let name = |id: Option<i64>| id.and_then(|i| self.tok.id_to_token(i as u32));
        self.image_wrap = spec
            .native
            .as_ref()
            .and_then(|n| Some((name(n.vision_start_id)?, name(n.vision_end_id)?)));
        self.video_token = spec
            .native
            .as_ref()
            .and_then(|n| Some((name(n.video_token_id)?, n.video_token_id?)));
    }

    /// Video markers in a prompt: the model's video token and `<video>` (0 for a model without one).
    pub fn video_markers(&self, text: &str) -> usize {
        match &self.video_token {
            Some((v, _)) => text.matches(v.as_str()).count() + text.matches(VIDEO_MARKER).count(),
            None => 0,
        }
    }

    /// `<video>` (LLaMA-Factory's and LLaVA-Video's marker) written as the model's own video token.
    fn own_video_marker(&self, text: &str) -> String {
        match &self.video_token {
            Some((v, _)) => text.replace(VIDEO_MARKER, v),
            None => text.to_string(),
        }
    }

    /// Replaces each video token of `ids` by that clip's placeholders (`counts`, in order).
    pub fn expand_videos(&self, ids: Vec<i64>, counts: &[usize]) -> Result<Vec<i64>> {
        let Some((_, vid)) = &self.video_token else {
            return Ok(ids);
        };
        let found = ids.iter().filter(|&&i| i == *vid).count();
        if found != counts.len() {
            return Err(Error::input(format!(
                "{found} video marker(s) but {} clip(s): each `<video>` needs exactly one clip",
                counts.len()
            )));
        }
        Ok(expand_token(&ids, *vid, counts))
    }

    /// Whether LLaVA's `<image>` stands for this model's own marker (Qwen2-VL's wrapped `<|image_pad|>`).
    fn aliases_llava_marker(&self) -> bool {
        self.image_wrap.is_some() && self.image_token != "<image>"
    }

    /// The image token with its wrapping tokens, as one marker stands in a prompt.
    pub fn wrapped_marker(&self) -> String {
        self.wrapped(&self.image_token)
    }

    fn wrapped(&self, token: &str) -> String {
        match &self.image_wrap {
            Some((a, b)) => format!("{a}{token}{b}"),
            None => token.to_string(),
        }
    }

    /// A raw prompt's LLaVA `<image>` and `<video>` markers as the model's own wrapped tokens.
    fn own_markers(&self, text: &str) -> String {
        let mut text = if self.aliases_llava_marker() {
            text.replace("<image>", &self.wrapped_marker())
        } else {
            text.to_string()
        };
        if let Some((v, _)) = &self.video_token {
            text = text.replace(VIDEO_MARKER, &self.wrapped(v));
        }
        text
    }

    /// `encode` with each image's original (height, width), in marker order.
    pub fn encode_sized(
        &self,
        text: &str,
        add_special: bool,
        sizes: &[[u32; 2]],
    ) -> Result<Vec<i64>> {
        self.encode_media(text, add_special, sizes, &[])
    }

    /// `encode_sized` with each clip's token count (its grid's), in video-marker order.
    pub fn encode_media(
        &self,
        text: &str,
        add_special: bool,
        sizes: &[[u32; 2]],
        video_tokens: &[usize],
    ) -> Result<Vec<i64>> {
        // a raw prompt may mark images with LLaVA's `<image>` and clips with `<video>`: the model's own (wrapped)
        // markers stand for them
        let replaced = self.own_markers(text);
        let text = replaced.as_str();
        let enc = self
            .tok
            .encode(text, add_special)
            .map_err(|e| Error::input(format!("tokenizer failed on the prompt: {e}")))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        let found = ids.iter().filter(|&&i| i == self.image_token_id).count();
        let markers = self.markers(text);
        if found != markers {
            return Err(Error::file(
                self.dir.join("tokenizer.json"),
                format!(
                    "the prompt has {markers} `{}` marker(s) but the tokenizer produced {found} image token(s) (id {}): the marker must be an added special token",
                    self.image_token, self.image_token_id
                ),
            ));
        }
        let counts = self.image_counts(found, sizes)?;
        self.expand_videos(self.expand(&ids, &counts), video_tokens)
    }

    /// Renders messages `(role, content)` through the chat template. Templates that iterate typed content parts
    /// (`{"type": "image"}`, `{"type": "text", "text": …}`, as llava-hf ships) get the content split at markers.
    pub fn render_chat(
        &self,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Err(Error::file(
                &self.dir,
                "this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json's chat_template); use --raw",
            ));
        };
        self.render_template(template, messages, add_generation_prompt)
    }

    /// Renders messages through any jinja chat template (the checkpoint's or a built-in one).
    pub fn render_template(
        &self,
        template: &str,
        messages: &[(String, String)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let typed = template.contains("['type']") || template.contains(".type");
        let msgs: Vec<Value> = messages
            .iter()
            .map(|(role, content)| {
                // LLaVA's `<image>` marks the model's own image token (Qwen2-VL's `<|image_pad|>`), `<video>`
                // its video token
                let content = &self.own_video_marker(&if self.aliases_llava_marker() {
                    content.replace("<image>", &self.image_token)
                } else {
                    content.clone()
                });
                let video = self.video_token.as_ref().map(|(v, _)| v.as_str());
                let content = if typed {
                    Value::Array(typed_parts(content, &self.image_token, video))
                } else if self.image_wrap.is_some() {
                    // a template without typed parts gets each image's wrapping tokens from here
                    let mut c = content.replace(self.image_token.as_str(), &self.wrapped_marker());
                    if let Some(v) = video {
                        c = c.replace(v, &self.wrapped(v));
                    }
                    Value::String(c)
                } else {
                    Value::String(content.clone())
                };
                serde_json::json!({"role": role, "content": content})
            })
            .collect();
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        let where_ = self.dir.join("chat_template");
        env.add_template("chat", template)
            .map_err(|e| Error::file(&where_, format!("invalid chat template: {e}")))?;
        let t = env.get_template("chat").unwrap();
        t.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(&msgs)),
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            add_generation_prompt => add_generation_prompt,
        })
        .map_err(|e| Error::file(&where_, format!("chat template failed: {e}")))
    }

    /// One user turn through the chat template with the generation prompt, tokenized without adding special tokens
    /// (the template renders BOS itself), as `apply_chat_template(..., tokenize=True)`.
    pub fn encode_chat(&self, user: &str) -> Result<Vec<i64>> {
        self.encode_chat_sized(user, &[])
    }

    /// `encode_chat` with each image's original (height, width), in marker order.
    pub fn encode_chat_sized(&self, user: &str, sizes: &[[u32; 2]]) -> Result<Vec<i64>> {
        self.encode_chat_media(user, sizes, &[])
    }

    /// `encode_chat_sized` with each clip's token count, in video-marker order.
    pub fn encode_chat_media(
        &self,
        user: &str,
        sizes: &[[u32; 2]],
        video_tokens: &[usize],
    ) -> Result<Vec<i64>> {
        let text = self.render_chat(&[("user".into(), user.into())], true)?;
        self.encode_media(&text, false, sizes, video_tokens)
    }

    /// Token ids and byte offsets into `text`, without special tokens added (templates render BOS themselves).
    /// Image markers stay single tokens here: the caller expands them.
    pub fn encode_offsets(&self, text: &str) -> Result<(Vec<i64>, Vec<(usize, usize)>)> {
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| Error::input(format!("tokenizer failed: {e}")))?;
        let ids = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        Ok((ids, enc.get_offsets().to_vec()))
    }

    /// Padding id for batches: `<pad>`/`[PAD]` when the vocabulary has one, else EOS, else 0 (padded positions are
    /// masked out of attention and loss, so the value only has to be a valid id).
    pub fn pad_id(&self) -> i64 {
        ["<pad>", "[PAD]", "<|endoftext|>"]
            .iter()
            .find_map(|t| self.token_id(t))
            .or(self.eos_token_id)
            .unwrap_or(0)
    }

    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.tok.token_to_id(token).map(i64::from)
    }

    /// Writes the tokenizer's files (as loaded) into a model directory `out`.
    pub fn save_files(&self, out: &Path) -> Result<()> {
        for (rel, bytes) in self.files.iter() {
            let p = out.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            std::fs::write(&p, bytes).map_err(|source| Error::Io { path: p, source })?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tok.decode(&ids, true).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
}
