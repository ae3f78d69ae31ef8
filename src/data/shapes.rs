//! The "shapes" world: a deterministic synthetic dataset written to disk in the same layout as real LLaVA data
//! (LLaVA JSON + PNG files), so the quickstart exercises the real loaders end to end, yet tiny models learn it
//! on a CPU in minutes.
//!
//! Each image is 32x32 RGB on white, split into a 2x2 grid of 16x16 cells ("top left", "top right",
//! "bottom left", "bottom right"). It holds 1–3 objects in distinct cells; an object is a filled circle, square
//! or triangle (about 12 px, centred in its cell, triangles pointing up) in red, green, blue or yellow. The world
//! is small enough to be learned completely, so a quickstart's scores mean something: a caption, a colour or a
//! count is either right or wrong.
//!
//! Everything is a pure function of (seed, split, index, purpose): each sample seeds its own `StdRng`, so any
//! sample can be regenerated alone and a change to one file's generator never shifts another file's samples.
//! The files mirror the stages of LLaVA-style training: `captions_train.json` (LLaVA-Pretrain),
//! `instruct_train.json` (LLaVA-Instruct, multi-turn, short-answer hints as in LLaVA-1.5), `text_train.json`
//! (text-only conversations), `lm_train.jsonl` (LLM pretraining text), three held-out eval sets, and a byte-level
//! BPE tokenizer trained on the text.
use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::fs;
use std::path::Path;

use crate::error::{Error, Result, read_json};

/// Bump when the generator changes, so `ensure` rewrites datasets made by an older version.
const VERSION: u64 = 8;
pub const POSITIONS: [&str; 4] = ["top left", "top right", "bottom left", "bottom right"];
const NUMBERS: [&str; 5] = ["zero", "one", "two", "three", "four"];
/// Special tokens, in id order (the trainer assigns ids in this order, before the byte alphabet).
pub const SPECIAL_TOKENS: [&str; 7] = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<image>",
    "<|im_start|>",
    "<|im_end|>",
];
/// 7 special tokens + the 256 byte symbols: below this the BPE has no room for merges.
const MIN_VOCAB: usize = SPECIAL_TOKENS.len() + 256;
/// LLaVA-1.5's prompt for short answers (a phrase, because positions are two words).
pub(crate) const SHORT_HINT: &str = "Answer the question using a single word or phrase.";
pub(crate) const YESNO_HINT: &str = "Answer yes or no.";
const CAPTION_PROMPTS: [&str; 8] = [
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short description of the image.",
    "Summarize the picture in one sentence.",
    "Write a caption for this image.",
    "What do you see in the image?",
    "Briefly describe what is shown.",
    "Provide a one-sentence caption for the picture.",
];
/// The world's chat template (`tokenizer/chat_template.jinja`): the image first, where the LM reads it during
/// captioning pre-training, then USER:/ASSISTANT: turns closed by EOS.
pub const CHAT_TEMPLATE: &str = include_str!("../../recipes/pretrain/shapes_chat_template.jinja");

/// Words of the chat templates the quickstart may use, so the tokenizer learns merges for them too.
const CHAT_WORDS: [&str; 11] = [
    "USER:",
    "ASSISTANT:",
    "A chat between a curious user and an artificial intelligence assistant.",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "system",
    "user",
    "assistant",
    "Human:",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
    /// Inside test for a pixel centre at (dx, dy) from the cell centre; each shape spans about 12 of 16 px.
    fn contains(self, dx: f32, dy: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= 36.0,
            Shape::Square => dx.abs() <= 6.0 && dy.abs() <= 6.0,
            // apex at dy = -6, base at dy = +6 (image y grows downwards, so it points up)
            Shape::Triangle => dy.abs() <= 6.0 && dx.abs() <= (dy + 6.0) / 2.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
}

impl Colour {
    pub const ALL: [Colour; 4] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        }
    }
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 170, 30],
            Colour::Blue => [30, 60, 220],
            Colour::Yellow => [230, 200, 20],
        }
    }
}

/// One object; `cell` indexes `POSITIONS` (reading order: 0 top left … 3 bottom right).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub cell: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapesConfig {
    pub seed: u64,
    pub train: usize,
    pub heldout: usize,
    pub vocab_size: usize,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        ShapesConfig {
            seed: 0,
            train: 3000,
            heldout: 200,
            vocab_size: 512,
        }
    }
}

/// The rng of one (seed, split, purpose, index). FNV-1a + splitmix64 rather than std's `DefaultHasher`, whose
/// output may change between Rust releases: the dataset must be the same bytes on every machine.
pub(crate) fn rng_for(seed: u64, split: &str, purpose: &str, index: usize) -> StdRng {
    let mut key = seed.to_le_bytes().to_vec();
    key.extend_from_slice(split.as_bytes());
    key.push(0xff);
    key.extend_from_slice(purpose.as_bytes());
    key.push(0xff);
    key.extend_from_slice(&(index as u64).to_le_bytes());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    StdRng::seed_from_u64(h ^ (h >> 31))
}

/// The objects of image `index` of `split`, sorted by cell.
pub fn objects(seed: u64, split: &str, index: usize) -> Vec<Object> {
    let mut rng = rng_for(seed, split, "objects", index);
    let n = rng.random_range(1..=3usize);
    let mut cells = [0usize, 1, 2, 3];
    cells.shuffle(&mut rng);
    let mut objs: Vec<Object> = cells[..n]
        .iter()
        .map(|&cell| Object {
            cell,
            shape: Shape::ALL[rng.random_range(0..3usize)],
            colour: Colour::ALL[rng.random_range(0..4usize)],
        })
        .collect();
    objs.sort_by_key(|o| o.cell);
    objs
}

/// The canonical caption: objects in reading order, e.g. "a red circle at the top left and a blue square at the
/// bottom right."
pub fn caption(objects: &[Object]) -> String {
    let mut objs = objects.to_vec();
    objs.sort_by_key(|o| o.cell);
    let parts: Vec<String> = objs
        .iter()
        .map(|o| {
            format!(
                "a {} {} at the {}",
                o.colour.name(),
                o.shape.name(),
                POSITIONS[o.cell.min(3)]
            )
        })
        .collect();
    match parts.len() {
        0 => "an empty image.".to_string(),
        1 => format!("{}.", parts[0]),
        n => format!("{} and {}.", parts[..n - 1].join(", "), parts[n - 1]),
    }
}

/// The 32x32 image: white background, each object filled in its 16x16 cell by per-pixel inside tests.
pub fn render(objects: &[Object]) -> RgbImage {
    let mut img = RgbImage::from_pixel(32, 32, Rgb([255, 255, 255]));
    for o in objects {
        let (ox, oy) = ((o.cell as u32 % 2) * 16, (o.cell as u32 / 2).min(1) * 16);
        for y in 0..16u32 {
            for x in 0..16u32 {
                // pixel centres, relative to the cell centre (8, 8)
                if o.shape.contains(x as f32 + 0.5 - 8.0, y as f32 + 0.5 - 8.0) {
                    img.put_pixel(ox + x, oy + y, Rgb(o.colour.rgb()));
                }
            }
        }
    }
    img
}

pub(crate) fn number(n: usize) -> &'static str {
    NUMBERS.get(n).copied().unwrap_or("many")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Colour,
    Shape,
    Count,
    CountColour,
    Position,
    YesNo,
    Describe,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Colour,
        Kind::Shape,
        Kind::Count,
        Kind::CountColour,
        Kind::Position,
        Kind::YesNo,
        Kind::Describe,
    ];
    /// Short-answer kinds: what the held-out VQA set and the LM text ask.
    pub(crate) const SHORT: [Kind; 5] = [
        Kind::Colour,
        Kind::Shape,
        Kind::Count,
        Kind::CountColour,
        Kind::Position,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Colour => "colour",
            Kind::Shape => "shape",
            Kind::Count => "count",
            Kind::CountColour => "count_colour",
            Kind::Position => "position",
            Kind::YesNo => "yesno",
            Kind::Describe => "describe",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qa {
    pub kind: Kind,
    pub question: String,
    pub answer: String,
}

impl Qa {
    /// The question as the model sees it. The answer-format hint is always there (as in LLaVA-1.5's data), so
    /// training prompts and eval prompts match and short answers are not confused with captions.
    pub fn prompt(&self) -> String {
        match self.kind {
            Kind::Describe => self.question.clone(),
            Kind::YesNo => format!("{}\n{YESNO_HINT}", self.question),
            _ => format!("{}\n{SHORT_HINT}", self.question),
        }
    }
}

/// Objects whose `key` occurs once: only those can be asked about without ambiguity.
fn unique<K: PartialEq>(objs: &[Object], key: impl Fn(&Object) -> K) -> Vec<Object> {
    objs.iter()
        .filter(|o| objs.iter().filter(|p| key(*p) == key(*o)).count() == 1)
        .copied()
        .collect()
}

/// A question of `kind` about `objs`, or None where that kind cannot be asked unambiguously.
pub fn ask(kind: Kind, objs: &[Object], rng: &mut StdRng) -> Option<Qa> {
    let (question, answer) = match kind {
        Kind::Colour => {
            let o = *unique(objs, |o| o.shape).choose(rng)?;
            (
                format!("What colour is the {}?", o.shape.name()),
                o.colour.name().to_string(),
            )
        }
        Kind::Shape => {
            let o = objs.choose(rng)?;
            (
                format!("What shape is at the {}?", POSITIONS[o.cell.min(3)]),
                o.shape.name().to_string(),
            )
        }
        Kind::Count => (
            "How many shapes are there?".to_string(),
            number(objs.len()).to_string(),
        ),
        Kind::CountColour => {
            let c = Colour::ALL[rng.random_range(0..4usize)];
            let n = objs.iter().filter(|o| o.colour == c).count();
            (
                format!("How many {} shapes are there?", c.name()),
                number(n).to_string(),
            )
        }
        Kind::Position => {
            let o = *unique(objs, |o| (o.colour, o.shape)).choose(rng)?;
            (
                format!("Where is the {} {}?", o.colour.name(), o.shape.name()),
                POSITIONS[o.cell.min(3)].to_string(),
            )
        }
        Kind::YesNo => {
            let present = rng.random_bool(0.5);
            return Some(probe(objs, present, rng));
        }
        Kind::Describe => ("Describe the image.".to_string(), caption(objs)),
    };
    Some(Qa {
        kind,
        question,
        answer,
    })
}

/// A yes/no probe (POPE-style): a present object, or a (colour, shape) pair drawn among the absent ones.
pub fn probe(objs: &[Object], present: bool, rng: &mut StdRng) -> Qa {
    let has = |c: Colour, s: Shape| objs.iter().any(|o| o.colour == c && o.shape == s);
    let absent: Vec<(Colour, Shape)> = Colour::ALL
        .iter()
        .flat_map(|&c| Shape::ALL.map(|s| (c, s)))
        .filter(|&(c, s)| !has(c, s))
        .collect();
    let (c, s) = match objs.choose(rng) {
        Some(o) if present => (o.colour, o.shape),
        // at most 4 objects among 12 pairs: something is always absent
        _ => absent[rng.random_range(0..absent.len())],
    };
    let answer = if has(c, s) { "yes" } else { "no" };
    Qa {
        kind: Kind::YesNo,
        question: format!("Is there a {} {}?", c.name(), s.name()),
        answer: answer.to_string(),
    }
}

/// A short-answer question of a random askable kind among `kinds`.
pub(crate) fn ask_one(kinds: &[Kind], objs: &[Object], rng: &mut StdRng) -> Option<Qa> {
    let mut kinds = kinds.to_vec();
    kinds.shuffle(rng);
    kinds.into_iter().find_map(|k| ask(k, objs, rng))
}

/// Number of text-only templates in `fact`.
const FACTS: usize = 11;

/// A text-only question about the world's words: keeps the LLM's plain-language skills in training, as LLaVA
/// mixes text-only conversations into its instruction data.
fn fact(template: usize, rng: &mut StdRng) -> (String, String) {
    let shape = Shape::ALL[rng.random_range(0..3usize)];
    match template {
        0 => {
            let sides = match shape {
                Shape::Circle => 0,
                Shape::Square => 4,
                Shape::Triangle => 3,
            };
            (
                format!("How many sides does a {} have?", shape.name()),
                number(sides).to_string(),
            )
        }
        1 => {
            let (a, b, mix) = [
                ("blue", "yellow", "green"),
                ("red", "yellow", "orange"),
                ("red", "blue", "purple"),
            ][rng.random_range(0..3usize)];
            let (a, b) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
            (
                format!("What colour do you get if you mix {a} and {b}?"),
                mix.to_string(),
            )
        }
        2 => ("Name a shape.".to_string(), shape.name().to_string()),
        3 => (
            "Name a colour.".to_string(),
            Colour::ALL[rng.random_range(0..4usize)].name().to_string(),
        ),
        4 => {
            let n = rng.random_range(2..=4usize);
            (format!("Count to {}.", number(n)), NUMBERS[1..=n].join(" "))
        }
        5 => {
            let n = rng.random_range(0..4usize);
            (
                format!("What number comes after {}?", number(n)),
                number(n + 1).to_string(),
            )
        }
        6 => {
            let (a, b) = (rng.random_range(0..=2usize), rng.random_range(0..=2usize));
            (
                format!("What is {} plus {}?", number(a), number(b)),
                number(a + b).to_string(),
            )
        }
        7 => {
            let a = rng.random_range(0..5usize);
            let b = (a + rng.random_range(1..5usize)) % 5;
            (
                format!("Which is bigger, {} or {}?", number(a), number(b)),
                number(a.max(b)).to_string(),
            )
        }
        8 => (
            format!("Is a {} round?", shape.name()),
            (if shape == Shape::Circle { "yes" } else { "no" }).to_string(),
        ),
        9 => {
            let (w, o) = [
                ("top", "bottom"),
                ("bottom", "top"),
                ("left", "right"),
                ("right", "left"),
            ][rng.random_range(0..4usize)];
            (format!("What is the opposite of {w}?"), o.to_string())
        }
        _ => (
            format!("Spell the word {}.", shape.name()),
            shape
                .name()
                .chars()
                .map(String::from)
                .collect::<Vec<_>>()
                .join(" "),
        ),
    }
}

/// A LLaVA conversation; `image_first` = Some(b) puts the `<image>` marker in the first human turn, before the
/// text when b (both placements occur in real data), after it otherwise.
pub(crate) fn convo(turns: &[(String, String)], image_first: Option<bool>) -> Value {
    let mut out = Vec::new();
    for (i, (q, a)) in turns.iter().enumerate() {
        let human = match (i, image_first) {
            (0, Some(true)) => format!("<image>\n{q}"),
            (0, Some(false)) => format!("{q}\n<image>"),
            _ => q.clone(),
        };
        out.push(json!({"from": "human", "value": human}));
        out.push(json!({"from": "gpt", "value": a}));
    }
    Value::Array(out)
}

pub(crate) fn image_rel(split: &str, i: usize) -> String {
    format!("images/{split}/{i:05}.png")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.to_path_buf();
    move |source| Error::Io { path, source }
}

pub(crate) use crate::error::write_atomic;

pub(crate) fn write_json(path: &Path, v: &Value) -> Result<()> {
    crate::error::write_json_atomic(path, v)
}

/// Trains the byte-level BPE. The trainer sums word counts (order-free), numbers the byte alphabet in sorted
/// order and breaks ties between equally frequent pairs by pair id, and `save` sorts vocab and merges, so the
/// file is the same bytes on every run (the ensure test regenerates and compares). The
/// full byte alphabet is kept so any text encodes, and `<image>` is stripped from the corpus by the caller so its
/// pieces waste no merges: it is a special token and never reaches the BPE.
fn train_tokenizer(corpus: &[String], vocab_size: usize, path: &Path) -> Result<()> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::normalizers::NormalizerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, TokenizerBuilder};
    let err = |e: tokenizers::Error| Error::file(path, format!("cannot build the tokenizer: {e}"));
    let byte_level = ByteLevel::new(false, false, true); // add_prefix_space, trim_offsets, use_regex
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level))
            .build()
            .map_err(err)?;
    tok.train(&mut trainer, corpus.iter()).map_err(err)?;
    let tmp = path.with_file_name("tokenizer.json.tmp");
    tok.save(&tmp, false).map_err(err)?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Writes the dataset into `out`. Idempotent: when `out/meta.json` already describes `cfg` it does nothing and
/// returns Ok(false); otherwise it writes everything (meta.json last, so an interrupted run is redone) and
/// returns Ok(true).
pub fn ensure(out: &Path, cfg: &ShapesConfig) -> Result<bool> {
    if cfg.vocab_size < MIN_VOCAB {
        return Err(Error::input(format!(
            "shapes: vocab_size {} is too small: it must be at least {MIN_VOCAB} (7 special tokens + 256 bytes)",
            cfg.vocab_size
        )));
    }
    let meta_path = out.join("meta.json");
    let meta = json!({"seed": cfg.seed, "train": cfg.train, "heldout": cfg.heldout,
                      "vocab_size": cfg.vocab_size, "version": VERSION});
    if meta_path.exists() {
        if read_json::<Value>(&meta_path).is_ok_and(|old| old == meta) {
            return Ok(false);
        }
        // We made this directory: drop the old images so a smaller run leaves no orphans behind, and the old
        // meta first so a crash from here on cannot leave a stale meta claiming a complete dataset.
        fs::remove_file(&meta_path).map_err(io_err(&meta_path))?;
        for split in ["train", "heldout"] {
            let dir = out.join("images").join(split);
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
        }
    }
    for dir in [
        out.join("images/train"),
        out.join("images/heldout"),
        out.join("tokenizer"),
    ] {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    }
    let train: Vec<Vec<Object>> = (0..cfg.train)
        .map(|i| objects(cfg.seed, "train", i))
        .collect();
    let held: Vec<Vec<Object>> = (0..cfg.heldout)
        .map(|i| objects(cfg.seed, "heldout", i))
        .collect();
    for (split, set) in [("train", &train), ("heldout", &held)] {
        for (i, objs) in set.iter().enumerate() {
            let p = out.join(image_rel(split, i));
            render(objs)
                .save(&p)
                .map_err(|e| Error::file(&p, format!("cannot write PNG: {e}")))?;
        }
    }

    let (mut captions, mut instruct, mut texts, mut lm) = (vec![], vec![], vec![], vec![]);
    for (i, objs) in train.iter().enumerate() {
        let s = cfg.seed;
        let mut rng = rng_for(s, "train", "caption", i);
        let prompt = CAPTION_PROMPTS[rng.random_range(0..CAPTION_PROMPTS.len())].to_string();
        let first = rng.random_bool(0.5);
        captions.push(
            json!({"id": format!("cap-train-{i:05}"), "image": image_rel("train", i),
                             "conversations": convo(&[(prompt, caption(objs))], Some(first))}),
        );

        let mut rng = rng_for(s, "train", "instruct", i);
        let n = rng.random_range(1..=3usize);
        let mut kinds = Kind::ALL;
        kinds.shuffle(&mut rng);
        // distinct kinds, so no record asks the same thing twice
        let turns: Vec<(String, String)> = kinds
            .iter()
            .filter_map(|&k| ask(k, objs, &mut rng))
            .take(n)
            .map(|qa| (qa.prompt(), qa.answer))
            .collect();
        let first = rng.random_bool(0.5);
        instruct.push(
            json!({"id": format!("inst-train-{i:05}"), "image": image_rel("train", i),
                             "conversations": convo(&turns, Some(first))}),
        );

        // LM text, three lines per image: the caption, one Q/A about the image, one world fact
        let mut rng = rng_for(s, "train", "lm", i);
        lm.push(caption(objs));
        let mut kinds = Kind::SHORT.to_vec();
        kinds.push(Kind::YesNo);
        if let Some(qa) = ask_one(&kinds, objs, &mut rng) {
            lm.push(format!("Q: {} A: {}", qa.question, qa.answer));
        }
        let (q, a) = fact(rng.random_range(0..FACTS), &mut rng);
        lm.push(format!("Q: {q} A: {a}"));
    }
    for i in 0..cfg.train / 2 {
        let mut rng = rng_for(cfg.seed, "train", "text", i);
        let mut templates: Vec<usize> = (0..FACTS).collect();
        templates.shuffle(&mut rng);
        let n = rng.random_range(1..=2usize);
        let turns: Vec<(String, String)> =
            templates[..n].iter().map(|&t| fact(t, &mut rng)).collect();
        texts.push(
            json!({"id": format!("text-train-{i:05}"), "conversations": convo(&turns, None)}),
        );
    }

    let (mut cap_eval, mut vqa_eval, mut pope_eval) = (vec![], vec![], vec![]);
    for (i, objs) in held.iter().enumerate() {
        let (s, img) = (cfg.seed, image_rel("heldout", i));
        let turn = [(CAPTION_PROMPTS[0].to_string(), caption(objs))];
        cap_eval.push(
            json!({"id": format!("cap-heldout-{i:05}"), "image": img, "task": "caption",
                             "conversations": convo(&turn, Some(true))}),
        );
        let mut rng = rng_for(s, "heldout", "vqa", i);
        if let Some(qa) = ask_one(&Kind::SHORT, objs, &mut rng) {
            let turn = [(qa.prompt(), qa.answer.clone())];
            vqa_eval.push(json!({"id": format!("vqa-heldout-{i:05}"), "image": img, "task": "vqa",
                                 "kind": qa.kind.name(), "conversations": convo(&turn, Some(true))}));
        }
        // alternate present/absent so exactly half the probes are "yes", as in POPE
        let qa = probe(objs, i % 2 == 0, &mut rng_for(s, "heldout", "pope", i));
        let turn = [(qa.prompt(), qa.answer.clone())];
        pope_eval.push(
            json!({"id": format!("pope-heldout-{i:05}"), "image": img, "task": "yesno",
                              "kind": "yesno", "conversations": convo(&turn, Some(true))}),
        );
    }

    let files = [
        ("captions_train.json", &captions),
        ("instruct_train.json", &instruct),
        ("text_train.json", &texts),
        ("caption_heldout.json", &cap_eval),
        ("vqa_heldout.json", &vqa_eval),
        ("pope_heldout.json", &pope_eval),
    ];
    for (name, records) in files {
        write_json(&out.join(name), &Value::Array(records.clone()))?;
    }
    let mut jsonl = String::new();
    for line in &lm {
        jsonl.push_str(&json!({"text": line}).to_string());
        jsonl.push('\n');
    }
    write_atomic(&out.join("lm_train.jsonl"), jsonl.as_bytes())?;

    // Tokenizer corpus: the training text (held-out text uses the same templates), the chat-template words and
    // the hints; `<image>` removed (see train_tokenizer).
    let mut corpus: Vec<String> = CHAT_WORDS
        .iter()
        .chain(&[SHORT_HINT, YESNO_HINT])
        .map(|s| s.to_string())
        .collect();
    for records in [&captions, &instruct, &texts] {
        for r in records.iter() {
            for t in r["conversations"].as_array().into_iter().flatten() {
                corpus.extend(t["value"].as_str().map(|v| v.replace("<image>", "")));
            }
        }
    }
    corpus.extend(lm.iter().cloned());
    train_tokenizer(
        &corpus,
        cfg.vocab_size,
        &out.join("tokenizer/tokenizer.json"),
    )?;
    write_atomic(
        &out.join("tokenizer/chat_template.jinja"),
        CHAT_TEMPLATE.as_bytes(),
    )?;
    write_json(
        &out.join("tokenizer/tokenizer_config.json"),
        &json!({"bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 512}),
    )?;

    let readme = format!(
        "# shapes\n\nA synthetic world generated by mitune (seed {seed}, generator version {VERSION}): 32x32 PNGs, \
white background, a 2x2 grid of cells holding 1-3 coloured circles, squares or triangles. Regenerated \
identically from meta.json.\n\n\
- `images/train/*.png` ({nt}), `images/heldout/*.png` ({nh}): disjoint splits.\n\
- `captions_train.json` ({nc}): LLaVA-Pretrain layout, one caption per image.\n\
- `instruct_train.json` ({ni}): LLaVA-Instruct layout, 1-3 turns; short answers carry LLaVA-1.5's hint.\n\
- `text_train.json` ({nx}): text-only conversations (no `image` key).\n\
- `lm_train.jsonl` ({nl}): `{{\"text\": ...}}` lines for language-model pretraining.\n\
- `caption_heldout.json` ({nh}, task caption), `vqa_heldout.json` ({nv}, task vqa, field `kind`), \
`pope_heldout.json` ({nh}, task yesno, half present / half absent): held-out evaluation.\n\
- `preference_{{train,heldout}}.jsonl`: preference pairs (mitune `pairs` layout): yes/no probes (faithful answer \
chosen; absent objects drawn by POPE's random, popular and adversarial samplings in turn, field `sampling`) and captions against hallucinated ones (an extra object, a wrong colour or shape).\n\
- `prompts_{{train,heldout}}.jsonl`: one short question per image with its `answer` (verifiable-reward prompts \
for GRPO/PPO).\n\
- `yesno_train.json`: POPE-style yes/no probes of every training image (LLaVA layout), as many absent objects \
as present ones.\n\
- `mc_train.json`: multiple-choice questions (LLaVA layout, lettered options, letter answers).\n\
- `eval/{{heldin,heldout}}/`: benchmark sets for `mitune eval` (see below): `vqa.jsonl`, `mc.jsonl`, \
`pope_{{random,popular,adversarial}}.json` (POPE layout), `captions.jsonl`; held-in sets use training images.\n\
- `tokenizer/`: byte-level BPE (vocab {vocab}) trained on the text; `<image>` has id 4.\n",
        seed = cfg.seed,
        nt = cfg.train,
        nh = cfg.heldout,
        nc = captions.len(),
        ni = instruct.len(),
        nx = texts.len(),
        nl = lm.len(),
        nv = vqa_eval.len(),
        vocab = cfg.vocab_size,
    );
    write_atomic(&out.join("README.md"), readme.as_bytes())?;
    super::shapes_eval::write(out, cfg.seed, &train, &held)?;
    write_json(&meta_path, &meta)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(shape: Shape, colour: Colour, cell: usize) -> Object {
        Object {
            shape,
            colour,
            cell,
        }
    }

    #[test]
    fn samples_are_deterministic() {
        for i in 0..20 {
            assert_eq!(objects(7, "train", i), objects(7, "train", i));
            assert_eq!(
                render(&objects(7, "train", i)),
                render(&objects(7, "train", i))
            );
        }
        let a: Vec<_> = (0..20).map(|i| objects(7, "train", i)).collect();
        let b: Vec<_> = (0..20).map(|i| objects(7, "heldout", i)).collect();
        assert_ne!(a, b, "splits must differ");
    }

    #[test]
    fn caption_format() {
        let (rc, bs, gt) = (
            obj(Shape::Circle, Colour::Red, 0),
            obj(Shape::Square, Colour::Blue, 3),
            obj(Shape::Triangle, Colour::Green, 1),
        );
        assert_eq!(caption(&[rc]), "a red circle at the top left.");
        assert_eq!(
            caption(&[bs, rc]),
            "a red circle at the top left and a blue square at the bottom right."
        );
        assert_eq!(
            caption(&[bs, gt, rc]),
            "a red circle at the top left, a green triangle at the top right and a blue square at the bottom right."
        );
    }

    #[test]
    fn yes_no_answers_match_objects() {
        let mut rng = StdRng::seed_from_u64(1);
        for i in 0..200 {
            let objs = objects(0, "train", i);
            for present in [true, false] {
                let qa = probe(&objs, present, &mut rng);
                assert_eq!(qa.answer, if present { "yes" } else { "no" });
                let asked: Vec<bool> = Colour::ALL
                    .iter()
                    .flat_map(|&c| Shape::ALL.map(|s| (c, s)))
                    .filter(|(c, s)| {
                        qa.question == format!("Is there a {} {}?", c.name(), s.name())
                    })
                    .map(|(c, s)| objs.iter().any(|o| o.colour == c && o.shape == s))
                    .collect();
                assert_eq!(asked, vec![present], "{qa:?} vs {objs:?}");
            }
        }
    }

    #[test]
    fn render_puts_shapes_in_their_cells() {
        let img = render(&[
            obj(Shape::Circle, Colour::Red, 0),
            obj(Shape::Square, Colour::Blue, 3),
            obj(Shape::Triangle, Colour::Yellow, 1),
        ]);
        let px = |x: u32, y: u32| img.get_pixel(x, y).0;
        assert_eq!(px(8, 8), Colour::Red.rgb());
        assert_eq!(px(24, 24), Colour::Blue.rgb());
        assert_eq!(px(24, 10), Colour::Yellow.rgb());
        assert_eq!(px(8, 24), [255, 255, 255]); // empty bottom-left cell
        assert_eq!(px(0, 0), [255, 255, 255]);
        // the triangle points up: wide at the bottom of its cell, empty at the top corners
        assert_eq!(px(16 + 3, 13), Colour::Yellow.rgb());
        assert_eq!(px(16 + 3, 4), [255, 255, 255]);
    }

    #[test]
    fn ensure_writes_a_consistent_dataset() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("mitune-shapes-{}-{nanos}", std::process::id()));
        let cfg = ShapesConfig {
            seed: 3,
            train: 24,
            heldout: 8,
            vocab_size: 320,
        };
        assert!(ensure(&dir, &cfg).unwrap());
        assert!(!ensure(&dir, &cfg).unwrap(), "second call must be a no-op");
        for name in [
            "captions_train.json",
            "instruct_train.json",
            "text_train.json",
            "caption_heldout.json",
            "vqa_heldout.json",
            "pope_heldout.json",
        ] {
            let records: Value = read_json(&dir.join(name)).unwrap();
            assert!(!records.as_array().unwrap().is_empty(), "{name}");
            for r in records.as_array().unwrap() {
                let images = match r.get("image").and_then(Value::as_str) {
                    Some(p) => {
                        assert!(dir.join(p).is_file(), "{p}");
                        1
                    }
                    None => 0,
                };
                let turns = r["conversations"].as_array().unwrap();
                let value = |t: &Value| t["value"].as_str().unwrap().to_string();
                let markers: usize = turns
                    .iter()
                    .map(|t| value(t).matches("<image>").count())
                    .sum();
                assert_eq!(markers, images, "{name}: {r}");
                assert_eq!(
                    value(&turns[0]).matches("<image>").count(),
                    images,
                    "{name}: {r}"
                );
                for (k, t) in turns.iter().enumerate() {
                    assert_eq!(t["from"], if k % 2 == 0 { "human" } else { "gpt" });
                }
            }
        }
        let lm = fs::read_to_string(dir.join("lm_train.jsonl")).unwrap();
        assert_eq!(lm.lines().count(), 3 * cfg.train);
        assert!(
            lm.lines()
                .all(|l| serde_json::from_str::<Value>(l).unwrap()["text"].is_string())
        );

        let tok_path = dir.join("tokenizer/tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(&tok_path).unwrap();
        for (id, t) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(t), Some(id as u32));
        }
        let text = caption(&objects(3, "train", 0));
        let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert!(ids.len() < text.len(), "the BPE learned no merges");
        assert_eq!(
            tok.encode("<image>\nDescribe the image.", false)
                .unwrap()
                .get_ids()[0],
            4
        );

        // regenerating gives the same bytes (the tokenizer trainer included)
        let before = (
            fs::read(&tok_path).unwrap(),
            fs::read(dir.join("instruct_train.json")).unwrap(),
        );
        fs::remove_file(dir.join("meta.json")).unwrap();
        assert!(ensure(&dir, &cfg).unwrap());
        assert_eq!(
            before,
            (
                fs::read(&tok_path).unwrap(),
                fs::read(dir.join("instruct_train.json")).unwrap()
            )
        );
        fs::remove_dir_all(&dir).ok();
    }
}
