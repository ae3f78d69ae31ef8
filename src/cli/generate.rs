//! `mitune generate`: prompt (+ images, clips) -> text, streamed, or one JSON object with ids and log-probs.
use std::path::PathBuf;

use crate::checkpoint::hf::llava_spec;
use crate::checkpoint::load_llava;
use crate::data::images::ImageProcessor;
use crate::data::tokenizer::TextProcessor;
use crate::data::video::ClipSource;
use crate::error::{Error, Result};
use crate::generate::{Clips, GenConfig, Prompt, cut_at_stop, generate_batch};
use crate::recipe::schema::Budget;
use crate::zoo::layers::float_tensor;
use crate::zoo::mllm::LlavaSpec;
use burn::tensor::Device;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (LlavaForConditionalGeneration layout, with tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt; each `<image>` marker takes one --image, in order.
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// A clip for a video model (Qwen2-VL): a directory of its frames (PNG/JPEG, name order); each `<video>`
    /// marker takes one --video, in order.
    #[arg(long)]
    pub video: Vec<PathBuf>,
    /// Frames per second the clip directories were extracted at (default: --fps, every frame read).
    #[arg(long)]
    pub frame_rate: Option<f64>,
    /// Frames sampled per second of clip (default: the checkpoint's video processor, 2).
    #[arg(long)]
    pub fps: Option<f64>,
    /// At most this many frames per clip (default: the checkpoint's video processor).
    #[arg(long)]
    pub max_frames: Option<usize>,
    /// Use the prompt as written (no chat template); BOS is added as the tokenizer does.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: Sampling,
    /// Print one JSON object: input_ids, output_ids, text, logprobs.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut spec = llava_spec(&a.model)?;
    let budget = Budget {
        fps: a.fps,
        max_frames: a.max_frames,
        frame_rate: a.frame_rate,
        ..Budget::default()
    };
    crate::model::apply_budget(
        &budget,
        "--fps / --max-frames / --frame-rate",
        &mut spec,
        &mut serde_json::Value::Null,
    )?;
    let mut text = TextProcessor::load(&a.model, spec.image_token_id, spec.image_tokens())?;
    text.configure(&spec);
    // InstructBLIP's processor puts every image first and needs no markers
    let images_first = crate::checkpoint::instructblip::is_instructblip(&spec);
    // Markers vs images first: nothing is computed for a prompt that cannot run.
    let markers = text.markers(&a.prompt);
    if markers != a.image.len() && !images_first {
        return Err(Error::input(format!(
            "the prompt has {markers} `{}` marker(s) but {} --image file(s) were given: give one image per marker",
            text.image_token,
            a.image.len()
        )));
    }
    let video_markers = text.video_markers(&a.prompt);
    if video_markers != a.video.len() {
        return Err(Error::input(if text.video_token.is_none() {
            "this checkpoint does not read videos (only Qwen2-VL / Qwen2.5-VL checkpoints do): drop --video"
                .to_string()
        } else {
            format!(
                "the prompt has {video_markers} `<video>` marker(s) but {} --video clip(s) were given: give one clip \
                 per marker",
                a.video.len()
            )
        }));
    }
    let mut eos = spec.llm.eos_token_ids.clone();
    eos.extend(text.eos_token_id);
    let cfg = a.sampling.config(a.max_new_tokens, eos)?;
    let device = crate::default_device();
    let (pixels, sizes, videos) = if a.image.is_empty() && a.video.is_empty() {
        (None, vec![], None)
    } else {
        let mut images = ImageProcessor::load(&a.model)?;
        images.configure(&spec);
        let (pixels, sizes) = images.batch_sized(&a.image, &device)?;
        (pixels, sizes, clips(&a.video, &spec, &images, &device)?)
    };
    let video_tokens = clip_tokens(&videos, &spec);
    let (ids, instructions) = if images_first {
        text.encode_images_first(&a.prompt, a.image.len(), !a.raw)?
    } else if a.raw {
        (
            text.encode_media(&a.prompt, true, &sizes, &video_tokens)?,
            vec![],
        )
    } else {
        (
            text.encode_chat_media(&a.prompt, &sizes, &video_tokens)?,
            vec![],
        )
    };
    let model = load_llava(&a.model, &device)?;
    let prompt = Prompt {
        instructions,
        ids: ids.clone(),
        pixels,
        sizes,
        videos,
        index: 0,
    };
    let decode = |ids: &[i64]| text.decode(ids);
    let mut stream = Stream::new(&text, &cfg.stop);
    let out = generate_batch(&model, vec![prompt], &cfg, Some(&decode), |_, id| {
        if !a.json {
            stream.push(id);
        }
    })?;
    let out = out.into_iter().next().unwrap_or_default();
    let decoded = cut_at_stop(&text.decode(&out.output_ids), &cfg.stop).to_string();
    if a.json {
        let v = serde_json::json!({
            "input_ids": ids,
            "output_ids": out.output_ids,
            "text": decoded,
            "logprobs": out.logprobs,
        });
        println!("{v}");
    } else {
        stream.finish();
        println!();
    }
    Ok(())
}

/// The clip directories sampled, decoded and patched into one batch of clips (`None`: no clips).
pub fn clips(
    dirs: &[PathBuf],
    spec: &LlavaSpec,
    images: &ImageProcessor,
    device: &Device,
) -> Result<Option<Clips>> {
    let Some(n) = spec.native.as_ref().filter(|_| !dirs.is_empty()) else {
        return Ok(None);
    };
    let (mut values, mut grids, mut seconds) = (vec![], vec![], vec![]);
    for d in dirs {
        let clip = ClipSource::Dir(d.clone()).open(n)?;
        let (v, grid) = images
            .video_patches(&clip.decode()?)
            .map_err(|m| Error::file(d, m))?;
        values.extend(v);
        grids.push(grid);
        seconds.push(clip.seconds_per_grid);
    }
    let (c, p) = (images.channels(), n.patch as usize);
    let k = values.len() / (c * p * p);
    Ok(Some(Clips {
        pixels: float_tensor(values, [k, c, p, p], device),
        grids,
        seconds,
    }))
}

/// Placeholders of each clip (its grid's tokens), in order.
pub fn clip_tokens(clips: &Option<Clips>, spec: &LlavaSpec) -> Vec<usize> {
    match (clips, &spec.native) {
        (Some(c), Some(n)) => c.grids.iter().map(|&g| n.grid_tokens(g)).collect(),
        _ => vec![],
    }
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(clap::Args)]
pub struct Sampling {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Stop once the output contains this string (repeatable; e.g. "USER:" for templates without an end-of-turn
    /// token); the string is cut from the printed text.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Sampling {
    /// The checked generation settings (a bad flag is a one-line error naming it).
    pub fn config(&self, max_new_tokens: usize, eos: Vec<i64>) -> Result<GenConfig> {
        let cfg = GenConfig {
            max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            eos,
            suppress: vec![],
            stop: self.stop.clone(),
        };
        cfg.check()
            .map_err(|m| Error::input(format!("--{}", m.replace('_', "-"))))?;
        Ok(cfg)
    }
}

/// Prints decoded text as ids arrive: only what is certain (complete UTF-8, and never the part of the text that
/// may turn out to be the start of a stop string).
pub struct Stream<'a> {
    text: &'a TextProcessor,
    stop: &'a [String],
    ids: Vec<i64>,
    shown: usize,
}

impl<'a> Stream<'a> {
    pub fn new(text: &'a TextProcessor, stop: &'a [String]) -> Self {
        Stream {
            text,
            stop,
            ids: vec![],
            shown: 0,
        }
    }

    pub fn push(&mut self, id: i64) {
        use std::io::Write;
        self.ids.push(id);
        let now = self.text.decode(&self.ids);
        let now = now.trim_end_matches('\u{fffd}');
        let cut = cut_at_stop(now, self.stop);
        // hold back a tail that could still grow into a stop string
        let hold = self
            .stop
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && cut.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let upto = cut.len() - hold;
        if upto > self.shown && cut.is_char_boundary(self.shown) {
            let mut lock = std::io::stdout().lock();
            let _ = write!(lock, "{}", &cut[self.shown..upto]);
            let _ = lock.flush();
            self.shown = upto;
        }
    }

    /// Prints what was held back (the output ended without completing a stop string).
    pub fn finish(&mut self) {
        use std::io::Write;
        let now = self.text.decode(&self.ids);
        let cut = cut_at_stop(&now, self.stop);
        if cut.len() > self.shown && cut.is_char_boundary(self.shown) {
            let _ = write!(std::io::stdout().lock(), "{}", &cut[self.shown..]);
        }
        self.shown = cut.len();
    }
}
