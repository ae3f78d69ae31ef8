//! The recipe schema: serde types only, no tensors. Every choice is an enum tagged by `kind` (or a closed string
//! enum), every struct denies unknown fields, so a typo is an error with its key path, never a silent default
//! (shared/STYLE.md principles 1 and 6). Dimensions are never repeated here: the connector's widths come from the
//! encoder and the LLM, the vocabulary from the tokenizer.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

// The connector spec stays with its component file (`zoo/connectors/`, which owns each connector's settings,
// HF mapping and forward); the rest of the schema is defined here.
// The zoo owns the model's names and specs; the recipe composes them with the stage, data and optimiser specs.
pub use crate::zoo::connectors::ConnectorSpec;
pub use crate::zoo::encoders::EncoderFamily;
pub use crate::zoo::llms::config::LlmFamily;
pub use crate::zoo::lora::{Adapter, AdapterKind};
pub use crate::zoo::parts::Part;
pub use crate::zoo::sizing::Budget;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// Stage names in the order they run.
    pub pipeline: Vec<String>,
    /// Where runs go: `<output>/<name>/`.
    #[serde(default = "default_output")]
    pub output: PathBuf,
    #[serde(default)]
    pub prepare: Vec<Prepare>,
    pub model: ModelSpec,
    pub stages: BTreeMap<String, StageSpec>,
    /// Generation-based held-out metrics, measured before the first stage and after every training stage.
    pub heldout: Option<Heldout>,
}
fn default_output() -> PathBuf {
    "checkpoints/runs".into()
}

/// Datasets generated on first use (the embedded shapes world).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Prepare {
    Shapes {
        out: PathBuf,
        #[serde(default)]
        seed: u64,
        train: usize,
        heldout: usize,
        #[serde(default = "default_vocab")]
        vocab_size: usize,
    },
}
fn default_vocab() -> usize {
    512
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A whole LlavaForConditionalGeneration directory (then encoder/llm/connector must be absent).
    pub from: Option<PathBuf>,
    pub encoder: Option<EncoderSpec>,
    pub connector: Option<ConnectorSpec>,
    pub llm: Option<LlmSource>,
    /// LLaVA-NeXT's AnyRes high-resolution tiling for a composed model (a `from` directory carries its own).
    pub anyres: Option<AnyResSpec>,
    /// Native-resolution models (Qwen2-VL): the pixel budget each image is resized into, overriding the
    /// checkpoint processor's (the memory control: image tokens ≈ pixels / (patch · merge)²).
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Video models (Qwen2-VL): each clip frame's pixel budget (the video processor's, smaller than images').
    pub video_min_pixels: Option<u64>,
    pub video_max_pixels: Option<u64>,
    /// Frames sampled per second of a clip, and at most this many per clip (the memory control for video).
    pub fps: Option<f64>,
    pub max_frames: Option<usize>,
    /// The rate a clip directory's frames were extracted at (default: `fps`, every frame read).
    pub frame_rate: Option<f64>,
}

/// `[model.anyres]`: candidate resolutions as [height, width] pixels, multiples of the encoder's input size (the
/// tile); each image is cut into the tiles of its best fit plus one downscaled whole-image tile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnyResSpec {
    pub pinpoints: Vec<[u32; 2]>,
    /// LLaVA-OneVision's `anyres_max_N`: downsample the stitched grid to about N tiles' worth of features. Makes
    /// the model a LLaVA-OneVision, whose images that share a sample with others are one padded-square tile each.
    pub max_tiles: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    /// Patch tokens only (LLaVA's `default`: the CLS token is dropped).
    Patch,
    /// Every token the tower outputs (`full`).
    Full,
}

/// An encoder from a weights directory (`weights`) or fresh from a preset with fields overridden.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderSpec {
    /// The family, named by the zoo's own enum (`clip_vit`, `siglip_vit`, `dinov2`).
    pub kind: EncoderFamily,
    pub weights: Option<PathBuf>,
    pub preset: Option<String>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_layers: Option<usize>,
    pub num_heads: Option<usize>,
    pub patch_size: Option<usize>,
    /// Input resolution (position embeddings interpolated when it differs from the weights').
    pub image_size: Option<usize>,
    #[serde(default = "default_feature_layer")]
    pub feature_layer: i64,
    #[serde(default = "default_select")]
    pub select: Select,
    /// `kind = "fused"`: the towers, each an encoder table of its own (kind, weights or preset, …); the outer
    /// `feature_layer`, `select` and `image_size` apply to every tower (a tower's own `feature_layer`/`select` is an
    /// error; its `image_size` is overridden by the outer one when that is given).
    pub towers: Option<Vec<EncoderSpec>>,
}
fn default_feature_layer() -> i64 {
    -2
}
fn default_select() -> Select {
    Select::Patch
}

/// An LLM from a weights directory (its tokenizer comes with it) or fresh from a preset (then `tokenizer` names
/// the directory with tokenizer.json, and the vocabulary size is the tokenizer's).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSource {
    /// The family, named by the zoo's own enum (`llama`, `mistral`, `qwen2`).
    pub kind: LlmFamily,
    pub weights: Option<PathBuf>,
    pub preset: Option<String>,
    pub tokenizer: Option<PathBuf>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_layers: Option<usize>,
    pub num_heads: Option<usize>,
    pub num_kv_heads: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StageSpec {
    /// Alignment pre-training on caption pairs: by default only the connector learns.
    Align(TrainStage),
    /// Instruction tuning: loss on the assistant turns only; by default connector and LLM learn.
    Instruct(TrainStage),
    /// Pre-training of the components themselves (causal LM on text, captioning for an encoder).
    Pretrain(TrainStage),
    /// Benchmarks (vqa, mc, pope, caption; M-ICL, M-CoT) on the model as it stands; logged like training metrics.
    Eval(EvalStage),
    /// Direct preference optimisation (and IPO, hinge, robust, SimPO, ORPO) on chosen/rejected pairs.
    Dpo(PrefStage),
    /// A reward model (backbone + scalar head) trained with the Bradley–Terry loss on preference pairs.
    Reward(PrefStage),
    /// Group relative policy optimisation: G sampled completions per prompt, group-normalised rewards, KL to
    /// the reference, no value model.
    Grpo(RlStage),
    /// PPO (RLHF): policy + value head, per-token KL penalty to the reference, GAE, clipped surrogate.
    Ppo(RlStage),
    /// Kahneman–Tversky optimisation on unpaired desirable / undesirable completions (TRL's KTOTrainer).
    Kto(KtoStage),
}

impl StageSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            StageSpec::Align(_) => "align",
            StageSpec::Instruct(_) => "instruct",
            StageSpec::Pretrain(_) => "pretrain",
            StageSpec::Eval(_) => "eval",
            StageSpec::Dpo(_) => "dpo",
            StageSpec::Reward(_) => "reward",
            StageSpec::Grpo(_) => "grpo",
            StageSpec::Ppo(_) => "ppo",
            StageSpec::Kto(_) => "kto",
        }
    }
    /// The stage's own seed (`stages.NAME.seed`), when it sets one.
    pub fn seed(&self) -> Option<u64> {
        match self {
            StageSpec::Align(t) | StageSpec::Instruct(t) | StageSpec::Pretrain(t) => t.seed,
            StageSpec::Eval(e) => e.seed,
            StageSpec::Dpo(p) | StageSpec::Reward(p) => p.seed,
            StageSpec::Grpo(r) | StageSpec::Ppo(r) => r.seed,
            StageSpec::Kto(k) => k.seed,
        }
    }
    /// The align/instruct/pretrain settings; None for the other kinds.
    pub fn train(&self) -> Option<&TrainStage> {
        match self {
            StageSpec::Align(t) | StageSpec::Instruct(t) | StageSpec::Pretrain(t) => Some(t),
            _ => None,
        }
    }
    pub fn init(&self) -> Option<&Init> {
        match self {
            StageSpec::Align(t) | StageSpec::Instruct(t) | StageSpec::Pretrain(t) => {
                t.init.as_ref()
            }
            StageSpec::Eval(e) => e.init.as_ref(),
            StageSpec::Dpo(p) | StageSpec::Reward(p) => p.init.as_ref(),
            StageSpec::Grpo(r) | StageSpec::Ppo(r) => r.init.as_ref(),
            StageSpec::Kto(k) => k.init.as_ref(),
        }
    }
    /// Whether the stage writes a model (`<stage>/model`) that later stages can start from.
    pub fn trains(&self) -> bool {
        !matches!(self, StageSpec::Eval(_))
    }
    /// The settings every training kind shares, as the step engine reads them (None for `eval`).
    pub fn steps(&self) -> Option<Steps<'_>> {
        macro_rules! view {
            ($s:expr, $eval_every:expr) => {
                Steps {
                    eval_every: $eval_every,
                    train: $s.train.as_deref(),
                    template: $s.template,
                    optim: &$s.optim,
                    schedule: &$s.schedule,
                    clip_grad_norm: $s.clip_grad_norm,
                    seed: $s.seed,
                    log_every: $s.log_every,
                    save_every: $s.save_every,
                    keep_last: $s.keep_last,
                    epochs: $s.epochs,
                    max_steps: $s.max_steps,
                    max_len: $s.max_len,
                    precision: $s.precision,
                    frozen_dtype: $s.frozen_dtype,
                    adapter: $s.adapter.as_ref(),
                }
            };
        }
        match self {
            StageSpec::Align(t) | StageSpec::Instruct(t) | StageSpec::Pretrain(t) => {
                Some(view!(t, t.eval.as_ref().map(|e| e.every)))
            }
            StageSpec::Dpo(p) | StageSpec::Reward(p) => Some(view!(p, p.eval_every)),
            StageSpec::Grpo(r) | StageSpec::Ppo(r) => Some(view!(r, r.eval_every)),
            StageSpec::Kto(k) => Some(view!(k, k.eval_every)),
            StageSpec::Eval(_) => None,
        }
    }
    /// The chat template the stage trains with (None for stages that do not train).
    pub fn template(&self) -> Option<Template> {
        match self {
            StageSpec::Align(t) | StageSpec::Instruct(t) | StageSpec::Pretrain(t) => {
                Some(t.template)
            }
            StageSpec::Dpo(p) | StageSpec::Reward(p) => Some(p.template),
            StageSpec::Grpo(r) | StageSpec::Ppo(r) => Some(r.template),
            StageSpec::Kto(k) => Some(k.template),
            StageSpec::Eval(_) => None,
        }
    }
}

/// What every training stage kind sets the same way: the step engine's view of a stage (`StageSpec::steps`).
#[derive(Debug, Clone, Copy)]
pub struct Steps<'a> {
    /// `train = [...]` when set (each kind has its own default).
    pub train: Option<&'a [String]>,
    pub template: Template,
    pub optim: &'a Optim,
    pub schedule: &'a Schedule,
    pub clip_grad_norm: f64,
    pub seed: Option<u64>,
    pub log_every: usize,
    pub save_every: usize,
    pub keep_last: usize,
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub max_len: usize,
    pub precision: Precision,
    pub frozen_dtype: Option<FrozenDtype>,
    /// LoRA/QLoRA adapters (`adapter = { kind = "lora", ... }`), on every training stage kind.
    pub adapter: Option<&'a Adapter>,
    /// Held-out evaluation every N steps (`eval.every` of align/instruct/pretrain, `eval_every` of the others).
    pub eval_every: Option<usize>,
}

/// `kind = "dpo"` / `kind = "reward"`: preference optimisation of the model of an earlier stage (the policy), against a frozen
/// reference copy or reference log-probs computed once and cached in the stage directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefStage {
    pub init: Option<Init>,
    /// Default: connector and LLM.
    pub train: Option<Vec<String>>,
    pub data: PrefData,
    /// Held-out pairs: preference accuracy and margin at the end of the stage.
    pub heldout: Option<PrefData>,
    /// Also evaluate `heldout` every N optimizer steps.
    pub eval_every: Option<usize>,
    /// Sequence packing: each micro-batch's chosen and rejected responses share rows of up to `max_len` tokens
    /// (attention within each, positions restarting), so the losses are the unpacked ones with less padding.
    #[serde(default)]
    pub pack: bool,
    pub template: Template,
    /// DPO only; default `{ kind = "sigmoid", beta = 0.1 }`.
    pub loss: Option<PrefLoss>,
    /// DPO only; default `frozen`.
    pub reference: Option<Reference>,
    /// In pairs: `global` pairs per optimizer step, `micro` pairs per forward (each forward holds 2×micro rows).
    pub batch: Batch,
    pub optim: Optim,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default = "one")]
    pub clip_grad_norm: f64,
    #[serde(default = "one")]
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub max_len: usize,
    /// Activation checkpointing per LLM block (as on align/instruct stages).
    #[serde(default)]
    pub checkpoint_activations: bool,
    /// Compute precision: `"f32"` (default); `"bf16-mixed"`: matrix products in bf16 with f32 master weights,
    /// optimizer moments, norms, softmax and loss (autocast); `"bf16"`: bf16-mixed with frozen weights stored in
    /// bf16 too.
    #[serde(default)]
    pub precision: Precision,
    /// Storage of frozen Linear and Embedding weights: `"f32"` or `"bf16"` (half their memory; the frozen values
    /// are rounded to bf16). Default: bf16 under `precision = "bf16"`, else f32.
    pub frozen_dtype: Option<FrozenDtype>,
    pub seed: Option<u64>,
    #[serde(default = "ten")]
    pub log_every: usize,
    #[serde(default = "hundred")]
    pub save_every: usize,
    #[serde(default = "two")]
    pub keep_last: usize,
    #[serde(default)]
    pub on_bad_sample: OnBad,
    /// Train low-rank adapters instead of the targeted weights (LoRA; QLoRA over a quantized base), as on
    /// align/instruct stages: `adapter = { kind = "lora", rank = 8, alpha = 16, targets = ["q_proj", "v_proj"] }`.
    pub adapter: Option<Adapter>,
}

/// `kind = "grpo"` / `kind = "ppo"`: on-policy RL from prompts (with reference answers for rule rewards).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlStage {
    pub init: Option<Init>,
    /// Default: connector and LLM.
    pub train: Option<Vec<String>>,
    pub data: PromptData,
    /// Held-out prompts: greedy answers scored by the rule rewards before and after the stage.
    pub heldout: Option<PromptData>,
    /// Also score `heldout` every N optimizer steps.
    pub eval_every: Option<usize>,
    pub template: Template,
    /// Completions sampled per prompt (G).
    #[serde(default = "four")]
    pub group: usize,
    /// Weighted reward terms: rules (`exact_match`, `yes_no`, `format`) and/or a reward model (`model`).
    pub rewards: Vec<RewardSpec>,
    /// β of the per-token KL penalty to the reference (k3 estimator); 0 = none (and no reference model).
    #[serde(default = "kl_beta")]
    pub kl_beta: f64,
    /// ε of the clipped ratio.
    #[serde(default = "clip_eps")]
    pub clip_eps: f64,
    /// Optimizer steps per rollout batch (GRPO's μ, PPO's epochs).
    #[serde(default = "one_usize")]
    pub updates: usize,
    /// Activation checkpointing per LLM block during the updates (as on the other training stages).
    #[serde(default)]
    pub checkpoint_activations: bool,
    /// GRPO: how the per-token losses are averaged (TRL's `loss_type`): `grpo` (each completion's token mean,
    /// then the mean over completions; default), `bnpo` (the token mean of each micro-batch, averaged over the
    /// micro-batches), `dr_grpo` (the token sum over completions × max_new_tokens, Dr. GRPO), `dapo` (the token
    /// sum over all completion tokens of the global batch, DAPO).
    pub loss_type: Option<GrpoLoss>,
    /// GRPO: the upper clip ε of the ratio (DAPO's clip-higher); default `clip_eps`.
    pub epsilon_high: Option<f64>,
    /// GRPO: `token` (default: a ratio per token) or `sequence` (GSPO: one ratio per completion, the exponential
    /// of its mean token log-ratio).
    pub importance_sampling_level: Option<SamplingLevel>,
    /// GRPO: what divides the advantages r − mean(group): `group` (the group's std, default), `batch` (the std
    /// of the whole global batch's rewards), `none` (Dr. GRPO: no scaling).
    pub scale_rewards: Option<ScaleRewards>,
    /// GRPO: DAPO's dynamic sampling, as the most refill rounds per micro-batch: a group whose rewards are all
    /// equal (no advantage, no signal) is dropped and replaced by a group of another prompt (the prompts the same
    /// micro-batch has at the following steps), up to this many rounds; a micro-batch still short trains on the
    /// groups it has. Off by default.
    pub dynamic_sampling: Option<usize>,
    /// PPO: discount γ of GAE (default 1).
    pub gamma: Option<f64>,
    /// PPO: λ of GAE (default 0.95).
    pub lam: Option<f64>,
    /// PPO: weight of the value loss (default 0.1).
    pub vf_coef: Option<f64>,
    #[serde(default)]
    pub sampling: Sampling,
    /// In prompts: `global` prompts per rollout batch, `micro` prompts per forward (each with `group` rows).
    pub batch: Batch,
    pub optim: Optim,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default = "one")]
    pub clip_grad_norm: f64,
    #[serde(default = "one")]
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub max_len: usize,
    /// Compute precision: `"f32"` (default); `"bf16-mixed"`: matrix products in bf16 with f32 master weights,
    /// optimizer moments, norms, softmax and loss (autocast); `"bf16"`: bf16-mixed with frozen weights stored in
    /// bf16 too.
    #[serde(default)]
    pub precision: Precision,
    /// Storage of frozen Linear and Embedding weights: `"f32"` or `"bf16"` (half their memory; the frozen values
    /// are rounded to bf16). Default: bf16 under `precision = "bf16"`, else f32.
    pub frozen_dtype: Option<FrozenDtype>,
    pub seed: Option<u64>,
    #[serde(default = "ten")]
    pub log_every: usize,
    #[serde(default = "hundred")]
    pub save_every: usize,
    #[serde(default = "two")]
    pub keep_last: usize,
    #[serde(default)]
    pub on_bad_sample: OnBad,
    /// Train low-rank adapters instead of the targeted weights (LoRA; QLoRA over a quantized base), as on
    /// align/instruct stages: `adapter = { kind = "lora", rank = 8, alpha = 16, targets = ["q_proj", "v_proj"] }`.
    pub adapter: Option<Adapter>,
}
fn four() -> usize {
    4
}

/// GRPO's loss normalisations (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLoss {
    #[default]
    Grpo,
    Bnpo,
    DrGrpo,
    Dapo,
}

/// Where GRPO's importance ratio is taken: per token (GRPO) or per completion (GSPO).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplingLevel {
    #[default]
    Token,
    Sequence,
}

/// What GRPO divides the centred rewards by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    #[default]
    Group,
    Batch,
    None,
}
fn kl_beta() -> f64 {
    0.04
}
fn clip_eps() -> f64 {
    0.2
}
fn one_usize() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptData {
    pub sources: Vec<PromptSource>,
}

/// Prompts `{id, image|images, prompt | conversations, answer?}` (a LLaVA record's last answer is its reference).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSource {
    pub path: PathBuf,
    pub images: Option<PathBuf>,
    pub cap: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// A frozen copy of the starting model runs beside the policy (2× weights in memory).
    #[default]
    Frozen,
    /// Reference log-probs of every pair computed once before training and stored in the stage directory.
    Cached,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefData {
    pub sources: Vec<PrefSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefSource {
    /// `pairs` (mitune JSONL), `llava_rlhf`, `rlhf_v`, `vlfeedback`, `llamafactory`, `trl`.
    pub format: PairFormat,
    pub path: PathBuf,
    pub images: Option<PathBuf>,
    /// Use at most this many pairs of the source.
    pub cap: Option<usize>,
}

/// `kind = "kto"`: Kahneman–Tversky optimisation (Ethayarajh et al. 2024) of the model of an earlier stage on
/// unpaired completions labelled desirable or undesirable, against a frozen copy of the starting model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KtoStage {
    pub init: Option<Init>,
    /// Default: connector and LLM.
    pub train: Option<Vec<String>>,
    pub data: UnpairedData,
    /// Held-out examples: loss and rewards at the end of the stage.
    pub heldout: Option<UnpairedData>,
    /// Also evaluate `heldout` every N optimizer steps.
    pub eval_every: Option<usize>,
    /// Sequence packing: each micro-batch's examples (and KL rows) share rows of up to `max_len` tokens.
    #[serde(default)]
    pub pack: bool,
    pub template: Template,
    /// β of the implied reward β·log(π/π_ref) (TRL's default 0.1).
    #[serde(default = "dpo_beta")]
    pub beta: f64,
    /// Weight of the desirable examples' losses (TRL's `desirable_weight`).
    #[serde(default = "one")]
    pub desirable_weight: f64,
    /// Weight of the undesirable examples' losses (TRL's `undesirable_weight`).
    #[serde(default = "one")]
    pub undesirable_weight: f64,
    /// In examples: `global` per optimizer step, `micro` per forward (at least 2: the KL baseline pairs each
    /// prompt with another example's completion of the micro-batch).
    pub batch: Batch,
    pub optim: Optim,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default = "one")]
    pub clip_grad_norm: f64,
    #[serde(default = "one")]
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub max_len: usize,
    /// Activation checkpointing per LLM block (as on the other training stages).
    #[serde(default)]
    pub checkpoint_activations: bool,
    #[serde(default)]
    pub precision: Precision,
    pub frozen_dtype: Option<FrozenDtype>,
    pub seed: Option<u64>,
    #[serde(default = "ten")]
    pub log_every: usize,
    #[serde(default = "hundred")]
    pub save_every: usize,
    #[serde(default = "two")]
    pub keep_last: usize,
    #[serde(default)]
    pub on_bad_sample: OnBad,
    /// LoRA/QLoRA adapters, as on every training stage.
    pub adapter: Option<Adapter>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnpairedData {
    pub sources: Vec<UnpairedSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnpairedSource {
    /// `kto` (TRL's unpaired layout plus media: `{id, image|images, prompt | conversations, completion, label}`)
    /// or a preference-pair layout (`pairs`, `llava_rlhf`, …), each pair read as a desirable chosen and an
    /// undesirable rejected example (TRL's `unpair_preference_dataset`).
    pub format: UnpairedFormat,
    pub path: PathBuf,
    pub images: Option<PathBuf>,
    /// Use at most this many examples of the source.
    pub cap: Option<usize>,
}

/// The layouts a KTO stage reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnpairedFormat {
    Kto,
    Pairs,
    LlavaRlhf,
    RlhfV,
    Vlfeedback,
    Llamafactory,
    Trl,
}

impl UnpairedFormat {
    /// The pair layout whose pairs are read unpaired; None for `kto` itself.
    pub fn paired(self) -> Option<PairFormat> {
        match self {
            UnpairedFormat::Kto => None,
            UnpairedFormat::Pairs => Some(PairFormat::Pairs),
            UnpairedFormat::LlavaRlhf => Some(PairFormat::LlavaRlhf),
            UnpairedFormat::RlhfV => Some(PairFormat::RlhfV),
            UnpairedFormat::Vlfeedback => Some(PairFormat::Vlfeedback),
            UnpairedFormat::Llamafactory => Some(PairFormat::Llamafactory),
            UnpairedFormat::Trl => Some(PairFormat::Trl),
        }
    }
}

/// `kind = "eval"`: evaluates the model of an earlier stage (default: the previous one) on benchmark tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalStage {
    pub init: Option<Init>,
    /// Default: the template of the last training stage before this one.
    pub template: Option<Template>,
    pub tasks: Vec<TaskSpec>,
    #[serde(default = "sixteen")]
    pub batch_size: usize,
    /// Default: 32, or 256 for tasks with `cot = true`.
    pub max_new_tokens: Option<usize>,
    /// Defaults to the recipe's seed (M-ICL demonstration draws).
    pub seed: Option<u64>,
    #[serde(default)]
    pub on_bad_sample: OnBad,
}
fn sixteen() -> usize {
    16
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainStage {
    /// Where the weights come from; default: the previous stage of the pipeline, or the model section.
    pub init: Option<Init>,
    /// Which parameters learn: `encoder`, `connector`, `llm`, or `re:<regex>` over parameter paths.
    pub train: Option<Vec<String>>,
    pub data: DataSpec,
    pub template: Template,
    pub batch: Batch,
    pub optim: Optim,
    #[serde(default)]
    pub schedule: Schedule,
    /// Clip the global gradient norm to this value (0 = off).
    #[serde(default = "one")]
    pub clip_grad_norm: f64,
    #[serde(default = "one")]
    pub epochs: f64,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<usize>,
    pub max_len: usize,
    /// Sequence packing: each global batch's samples share rows of up to `max_len` tokens (first fit, longest
    /// first) instead of one padded row each; attention stays within a sample (block-diagonal causal mask) and
    /// positions restart at each sample, so the loss is the unpacked one. Fewer, fuller rows: less padding.
    #[serde(default)]
    pub pack: bool,
    /// Activation checkpointing per LLM block: keep only each block's input through the forward pass and run each
    /// block again during the backward pass. Less memory for activations, one more forward of the blocks.
    #[serde(default)]
    pub checkpoint_activations: bool,
    /// Compute precision: `"f32"` (default); `"bf16-mixed"`: matrix products in bf16 with f32 master weights,
    /// optimizer moments, norms, softmax and loss (autocast); `"bf16"`: bf16-mixed with frozen weights stored in
    /// bf16 too.
    #[serde(default)]
    pub precision: Precision,
    /// Storage of frozen Linear and Embedding weights: `"f32"` or `"bf16"` (half their memory; the frozen values
    /// are rounded to bf16). Default: bf16 under `precision = "bf16"`, else f32.
    pub frozen_dtype: Option<FrozenDtype>,
    /// Defaults to the recipe's seed.
    pub seed: Option<u64>,
    #[serde(default = "ten")]
    pub log_every: usize,
    pub eval: Option<EvalSpec>,
    #[serde(default = "hundred")]
    pub save_every: usize,
    #[serde(default = "two")]
    pub keep_last: usize,
    #[serde(default)]
    pub on_bad_sample: OnBad,
    /// Also export one component of the final model as a standalone directory (pre-training recipes release
    /// encoders and LLMs this way): `export = { part = "llm", dtype = "bf16" }`.
    pub export: Option<Export>,
    /// Train low-rank adapters instead of the targeted weights (LoRA; QLoRA over a quantized base):
    /// `adapter = { kind = "lora", rank = 8, alpha = 16, targets = ["q_proj", "v_proj"] }`.
    pub adapter: Option<Adapter>,
}

fn one() -> f64 {
    1.0
}
fn ten() -> usize {
    10
}
fn hundred() -> usize {
    100
}
fn two() -> usize {
    2
}

/// Exactly one of: `{ from_stage = "align" }` (the final weights of an earlier stage of this pipeline) or
/// `{ checkpoint = DIR }` (a LlavaForConditionalGeneration directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Init {
    pub from_stage: Option<String>,
    pub checkpoint: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    pub part: ExportPart,
    #[serde(default)]
    pub dtype: StoreDtype,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

/// A training stage's `precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Precision {
    #[default]
    #[serde(rename = "f32")]
    F32,
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    /// bf16-mixed compute and frozen weights stored in bf16.
    #[serde(rename = "bf16")]
    Bf16,
}

/// A training stage's `frozen_dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrozenDtype {
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportPart {
    Encoder,
    Llm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBad {
    #[default]
    Fail,
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    /// LLaVA pre-training: the image, then the caption; instructions dropped.
    Plain,
    VicunaV1,
    /// `llama_2` as the docs and messages write it (serde's own spelling, `llama2`, also reads).
    #[serde(rename = "llama_2", alias = "llama2")]
    Llama2,
    Chatml,
    /// The checkpoint's own jinja chat template.
    Tokenizer,
}

/// A unit enum from the name a recipe writes (how the CLI parses `--template`, `--task`): `what` and `names` for
/// the error.
fn from_name<T: serde::de::DeserializeOwned>(
    s: &str,
    what: &str,
    names: &str,
) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s))
        .map_err(|_| format!("unknown {what} {s:?} (one of {names})"))
}

impl std::str::FromStr for Template {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        from_name(
            s,
            "template",
            "plain, vicuna_v1, llama_2, chatml, tokenizer",
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub global: usize,
    pub micro: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Optim {
    Adamw {
        lr: f64,
        #[serde(default = "betas")]
        betas: [f64; 2],
        #[serde(default = "eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
        /// Per-part learning rates (`connector = 1e-3`), overriding `lr` for that part.
        #[serde(default)]
        part_lr: BTreeMap<String, f64>,
    },
}
fn betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn eps() -> f64 {
    1e-8
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    Constant {
        #[serde(default)]
        warmup_steps: usize,
    },
    Linear {
        #[serde(default)]
        warmup_ratio: f64,
        #[serde(default)]
        warmup_steps: usize,
    },
    WarmupCosine {
        #[serde(default)]
        warmup_ratio: f64,
        #[serde(default)]
        warmup_steps: usize,
        #[serde(default)]
        min_lr_ratio: f64,
    },
}
impl Default for Schedule {
    fn default() -> Self {
        Schedule::Constant { warmup_steps: 0 }
    }
}

/// One source or a mixture of several.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub sources: Vec<Source>,
    #[serde(default)]
    pub mix: Mix,
    /// LLaVA's `expand2square`: pad to a square with the processor's mean colour before resizing.
    #[serde(default)]
    pub pad_to_square: bool,
    /// Native-resolution models (Qwen2-VL): this stage's pixel budget per image, over the model's (e.g. a
    /// high-resolution stage after a low-resolution one).
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Video models (Qwen2-VL): each clip frame's pixel budget (the video processor's, smaller than images').
    pub video_min_pixels: Option<u64>,
    pub video_max_pixels: Option<u64>,
    /// Frames sampled per second of a clip, and at most this many per clip (the memory control for video).
    pub fps: Option<f64>,
    pub max_frames: Option<usize>,
    /// The rate a clip directory's frames were extracted at (default: `fps`, every frame read).
    pub frame_rate: Option<f64>,
}

impl ModelSpec {
    pub fn budget(&self) -> Budget {
        Budget {
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
            video_min_pixels: self.video_min_pixels,
            video_max_pixels: self.video_max_pixels,
            fps: self.fps,
            max_frames: self.max_frames,
            frame_rate: self.frame_rate,
        }
    }
}

impl DataSpec {
    pub fn budget(&self) -> Budget {
        Budget {
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
            video_min_pixels: self.video_min_pixels,
            video_max_pixels: self.video_max_pixels,
            fps: self.fps,
            max_frames: self.max_frames,
            frame_rate: self.frame_rate,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mix {
    /// Shuffled together.
    #[default]
    Mixed,
    /// One source after another, each shuffled.
    Sequential,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// LLaVA JSON or JSONL: `id`, `image`/`images`, `conversations` of human/gpt turns.
    LlavaJson {
        path: PathBuf,
        /// Image paths are relative to this folder (default: the file's folder).
        images: Option<PathBuf>,
        #[serde(default = "one")]
        weight: f64,
        cap: Option<usize>,
        /// This source's own pixel budget and clip settings (native-resolution models), over the stage's: e.g.
        /// documents at a high `max_pixels` beside photos at a low one, in one stage.
        min_pixels: Option<u64>,
        max_pixels: Option<u64>,
        video_min_pixels: Option<u64>,
        video_max_pixels: Option<u64>,
        fps: Option<f64>,
        max_frames: Option<usize>,
        frame_rate: Option<f64>,
    },
    /// ShareGPT-style `messages` of role/content with an `images` list.
    Messages {
        path: PathBuf,
        images: Option<PathBuf>,
        #[serde(default = "one")]
        weight: f64,
        cap: Option<usize>,
        min_pixels: Option<u64>,
        max_pixels: Option<u64>,
        video_min_pixels: Option<u64>,
        video_max_pixels: Option<u64>,
        fps: Option<f64>,
        max_frames: Option<usize>,
        frame_rate: Option<f64>,
    },
    /// Plain caption pairs `{image, caption}`; an instruction is sampled from `instructions` per sample.
    Captions {
        path: PathBuf,
        images: Option<PathBuf>,
        #[serde(default)]
        instructions: Vec<String>,
        #[serde(default = "one")]
        weight: f64,
        cap: Option<usize>,
        min_pixels: Option<u64>,
        max_pixels: Option<u64>,
        video_min_pixels: Option<u64>,
        video_max_pixels: Option<u64>,
        fps: Option<f64>,
        max_frames: Option<usize>,
        frame_rate: Option<f64>,
    },
    /// VQA pairs `{image, question, answer}` turned into instructions, with a short-answer hint.
    Vqa {
        path: PathBuf,
        images: Option<PathBuf>,
        #[serde(default = "hint")]
        hint: String,
        #[serde(default = "one")]
        weight: f64,
        cap: Option<usize>,
        min_pixels: Option<u64>,
        max_pixels: Option<u64>,
        video_min_pixels: Option<u64>,
        video_max_pixels: Option<u64>,
        fps: Option<f64>,
        max_frames: Option<usize>,
        frame_rate: Option<f64>,
    },
    /// Raw text `{"text": …}` per JSONL line: every token is supervised (causal LM).
    Text {
        path: PathBuf,
        #[serde(default = "one")]
        weight: f64,
        cap: Option<usize>,
    },
}
fn hint() -> String {
    "Answer with a single word.".into()
}

impl Source {
    /// The source's own budget (empty for a text source or when it sets none).
    pub fn budget(&self) -> Budget {
        match self {
            Source::LlavaJson {
                min_pixels,
                max_pixels,
                video_min_pixels,
                video_max_pixels,
                fps,
                max_frames,
                frame_rate,
                ..
            }
            | Source::Messages {
                min_pixels,
                max_pixels,
                video_min_pixels,
                video_max_pixels,
                fps,
                max_frames,
                frame_rate,
                ..
            }
            | Source::Captions {
                min_pixels,
                max_pixels,
                video_min_pixels,
                video_max_pixels,
                fps,
                max_frames,
                frame_rate,
                ..
            }
            | Source::Vqa {
                min_pixels,
                max_pixels,
                video_min_pixels,
                video_max_pixels,
                fps,
                max_frames,
                frame_rate,
                ..
            } => Budget {
                min_pixels: *min_pixels,
                max_pixels: *max_pixels,
                video_min_pixels: *video_min_pixels,
                video_max_pixels: *video_max_pixels,
                fps: *fps,
                max_frames: *max_frames,
                frame_rate: *frame_rate,
            },
            Source::Text { .. } => Budget::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Held-out loss every N optimizer steps.
    pub every: usize,
    pub data: DataSpec,
    #[serde(default = "sixty_four")]
    pub max_samples: usize,
}
fn sixty_four() -> usize {
    64
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heldout {
    pub tasks: Vec<HeldoutTask>,
    /// Template used to prompt; defaults to the last training stage's.
    pub template: Option<Template>,
    #[serde(default = "thirty_two")]
    pub max_new_tokens: usize,
    #[serde(default = "two_hundred")]
    pub limit: usize,
}
fn thirty_two() -> usize {
    32
}
fn two_hundred() -> usize {
    200
}

/// A held-out set in LLaVA layout (one question, one reference answer per record) scored by exact match after
/// VQA-style normalisation (case, punctuation, articles).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldoutTask {
    pub name: String,
    pub path: PathBuf,
    pub images: Option<PathBuf>,
}

// Schema types the stages read (their behaviour lives beside the code that runs them).

/// A preference dataset's layout (shared/formats/).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairFormat {
    Pairs,
    LlavaRlhf,
    RlhfV,
    Vlfeedback,
    Llamafactory,
    Trl,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PrefLoss {
    Sigmoid {
        #[serde(default = "dpo_beta")]
        beta: f64,
        #[serde(default)]
        label_smoothing: f64,
    },
    Robust {
        #[serde(default = "dpo_beta")]
        beta: f64,
        label_smoothing: f64,
    },
    Ipo {
        #[serde(default = "dpo_beta")]
        beta: f64,
    },
    Hinge {
        #[serde(default = "dpo_beta")]
        beta: f64,
    },
    Simpo {
        #[serde(default = "simpo_beta")]
        beta: f64,
        /// Target reward margin γ.
        #[serde(default = "simpo_gamma")]
        gamma: f64,
    },
    Orpo {
        /// Weight λ of the odds-ratio term.
        #[serde(default = "dpo_beta")]
        lambda: f64,
    },
}
fn dpo_beta() -> f64 {
    0.1
}
fn simpo_beta() -> f64 {
    2.0
}
fn simpo_gamma() -> f64 {
    1.0
}

/// How completions are sampled.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    #[serde(default = "one_f64")]
    pub temperature: f64,
    #[serde(default = "one_f64")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "thirty_two_usize")]
    pub max_new_tokens: usize,
}
impl Sampling {
    /// What is wrong with the settings for on-policy RL, as (key, reason): the completions of a group must differ.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![];
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            out.push((
                "temperature",
                format!(
                    "{}: must be a finite number > 0 (at 0 every completion of a group is the same greedy one)",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            out.push(("top_p", format!("{}: must be in (0, 1]", self.top_p)));
        }
        if self.max_new_tokens == 0 {
            out.push(("max_new_tokens", "0: must be at least 1".into()));
        }
        out
    }
}
impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 32,
        }
    }
}

/// A reward term; a stage's reward is the weighted sum of its terms.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardSpec {
    /// 1 when the answer (first line) equals the prompt's reference after VQA normalisation.
    ExactMatch {
        #[serde(default = "one_f64")]
        weight: f64,
    },
    /// 1 when the answer's yes/no (POPE's rule) agrees with a yes/no reference.
    YesNo {
        #[serde(default = "one_f64")]
        weight: f64,
    },
    /// 1 when the whole completion matches the regex.
    Format {
        pattern: String,
        #[serde(default = "one_f64")]
        weight: f64,
    },
    /// IoU of the first box in the completion with the reference's box (each the first four numbers of the text:
    /// `[x1, y1, x2, y2]`, `{"bbox_2d": [...]}`, `(x1,y1),(x2,y2)`); with `threshold`, 1 when IoU ≥ threshold.
    Iou {
        threshold: Option<f64>,
        #[serde(default = "one_f64")]
        weight: f64,
    },
    /// A program of the user's: reads one JSON line per rollout on stdin (`id`, `prompt`, `conversation`,
    /// `completion`, `answer`, `images`), prints one number per line (stages::rewards).
    Command {
        /// The program and its arguments, run without a shell: `["python3", "score.py"]`.
        command: Vec<String>,
        /// Seconds it may take for one micro-batch of rollouts before it is killed and the stage stops.
        #[serde(default = "sixty_f64")]
        timeout_s: f64,
        #[serde(default = "one_f64")]
        weight: f64,
    },
    /// The score of a reward model (a `kind = "reward"` stage of this pipeline, or its saved directory).
    Model {
        from_stage: Option<String>,
        path: Option<PathBuf>,
        #[serde(default = "one_f64")]
        weight: f64,
    },
}

fn one_f64() -> f64 {
    1.0
}
fn sixty_f64() -> f64 {
    60.0
}
fn thirty_two_usize() -> usize {
    32
}

/// One task of an evaluation: `{ task = "pope", data = "...", shots = 2 }` in a recipe, or `mitune eval` flags.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Shown in tables and metrics; default: the task kind and the file name.
    pub name: Option<String>,
    pub task: TaskKind,
    pub data: PathBuf,
    /// Folder the image paths are relative to (default: the data file's folder).
    pub images: Option<PathBuf>,
    /// `held_in` (the training distribution) or `held_out`; reported with the scores.
    #[serde(default)]
    pub split: Split,
    /// Answer-format instruction appended to the question; default per task (LLaVA-1.5's eval prompts).
    pub hint: Option<String>,
    /// M-ICL: number of demonstrations (image + question + answer turns) before the query.
    #[serde(default)]
    pub shots: usize,
    /// Demonstration pool (same task layout); default: the evaluated file itself, never the query's own image.
    pub demos: Option<PathBuf>,
    /// M-CoT: ask for reasoning before the answer, score the text after the last "Answer:".
    #[serde(default)]
    pub cot: bool,
    /// Evaluate the first N samples only.
    pub limit: Option<usize>,
}

impl TaskSpec {
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let stem = self
                .data
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            format!("{}:{stem}", self.task.name())
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    HeldIn,
    #[default]
    HeldOut,
}

/// An evaluation task kind (`task = "vqa"`, `mitune eval --task vqa`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Short answers, VQA accuracy.
    Vqa,
    /// Multiple choice (ScienceQA-style), accuracy overall and per category.
    Mc,
    /// Yes/no object probing: accuracy, precision, recall, F1, yes-ratio.
    Pope,
    /// Captioning: BLEU-4 and CIDEr-D over the split.
    Caption,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Vqa => "vqa",
            TaskKind::Mc => "mc",
            TaskKind::Pope => "pope",
            TaskKind::Caption => "caption",
        }
    }
}

impl std::str::FromStr for TaskKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        from_name(s, "task", "vqa, mc, pope, caption")
    }
}
