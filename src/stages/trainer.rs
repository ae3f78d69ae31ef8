//! The loop of align, instruct and pretrain, run through the step engine (`steps::Engine`): forward, masked
//! cross-entropy, backward, accumulate micro-batches (averaging over the global batch's supervised tokens); the
//! engine clips, steps AdamW per parameter group on the schedule, logs and checkpoints. Checkpoints hold everything
//! an exact resume needs (weights, optimizer moments, parameter ids, step); the data order and learning rate are
//! pure functions of the step, so nothing else is state.
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::build::{Built, export};
use super::log::Metrics;
use super::loss;
use super::steps::Engine;
use crate::checkpoint::peft;
use crate::data::contract::{self, Bad, Kind};
use crate::data::images::ImageProcessor;
use crate::data::loader::{self, MicroBatch, Order};
use crate::data::prepare::{self, Prepared};
use crate::error::{Error, Result};
use crate::recipe::schema::{Adapter, Part, StageSpec};
use crate::zoo::layers::float_tensor;
use crate::zoo::lora;
use crate::zoo::mllm::{Llava, Media, MmInput};

pub struct StageRun<'a> {
    pub name: &'a str,
    pub spec: &'a StageSpec,
    pub dir: PathBuf,
    pub seed: u64,
    pub device: &'a Device,
    pub metrics: &'a mut Metrics,
}

/// The model's input for a micro-batch; a sample left out for media that failed to decode is an error here (the
/// stages whose rows come in pairs or groups cannot drop one: the trainer applies `on_bad_sample` before this).
pub fn to_input(mb: &MicroBatch, device: &Device) -> Result<MmInput> {
    if let Some((_, why)) = mb.dropped.first() {
        return Err(Error::input(format!(
            "{} sample(s) of this batch failed to load (changed on disk since the dataset's checks?): {why}",
            mb.dropped.len()
        )));
    }
    let pixels = match &mb.pixels {
        Ok(Some((v, shape))) => Some(float_tensor(v.clone(), *shape, device)),
        Ok(None) => None,
        Err(e) => return Err(Error::input(format!("image failed to load: {e}"))),
    };
    let videos = match &mb.videos {
        Ok(Some((v, shape))) => Some(float_tensor(v.clone(), *shape, device)),
        Ok(None) => None,
        Err(e) => return Err(Error::input(format!("video frame failed to load: {e}"))),
    };
    let mut input = MmInput::new(mb.ids.clone(), mb.attention.clone(), pixels)
        .with_rows(mb.image_sizes.clone(), mb.images_per_row.clone())
        .with_grids(mb.image_grids.clone());
    if !mb.instructions.is_empty()
        && let Some(Media::Images(p)) = input.media.pop()
    {
        input.media.push(Media::InstructedImages {
            pixels: p,
            instructions: mb.instructions.clone(),
        });
    }
    Ok(input
        .with_videos(videos, mb.video_grids.clone(), mb.video_seconds.clone())
        .with_segments(mb.segments.clone()))
}

/// Summed masked CE of one micro-batch (on whatever device the model lives).
pub fn micro_loss(
    model: &Llava,
    mb: &MicroBatch,
    device: &Device,
) -> Result<burn::tensor::Tensor<1>> {
    let input = to_input(mb, device)?;
    let hidden = model.hidden(&input)?;
    let head = |h| model.language_model.logits(h);
    Ok(loss::masked_ce_sum(hidden, head, &mb.ids, &mb.labels))
}

/// One micro-batch's loss / `norm` (the masked cross-entropy of `micro_loss`) and its gradients, with activations
/// checkpointed per LLM block when `checkpoint` (`checkpoint_activations`).
pub fn micro_grads(
    model: &Llava,
    mb: &MicroBatch,
    device: &Device,
    norm: f64,
    checkpoint: bool,
) -> Result<(f64, GradientsParams)> {
    let input = to_input(mb, device)?;
    let head = |h| model.language_model.logits(h);
    let (v, g, ()) = hidden_backward(model, model, &input, checkpoint, |hidden| {
        let l = loss::masked_ce_sum(hidden, head, &mb.ids, &mb.labels).div_scalar(norm);
        Ok((l, ()))
    })?;
    Ok((v, g))
}

/// Value and gradients (for `module`'s parameters) of `tail(final hidden states of llava)` — a loss, plus whatever
/// else the stage wants back as `T` — in one plain backward pass, or with activations checkpointed per LLM block
/// when `checkpoint` (`checkpointed_backward`). Every training stage that reads the LLM's hidden states goes
/// through here.
pub fn hidden_backward<M: Module, T>(
    module: &M,
    llava: &Llava,
    input: &MmInput,
    checkpoint: bool,
    tail: impl FnOnce(Tensor<3>) -> Result<(Tensor<1>, T)>,
) -> Result<(f64, GradientsParams, T)> {
    if checkpoint {
        return checkpointed_backward(module, llava, input, tail);
    }
    let (l, extra) = tail(llava.hidden(input)?)?;
    let value = l.clone().into_scalar::<f32>() as f64;
    Ok((
        value,
        GradientsParams::from_grads(l.backward(), module),
        extra,
    ))
}

fn checkpointed_backward<M: Module, T>(
    module: &M,
    llava: &Llava,
    input: &MmInput,
    tail: impl FnOnce(Tensor<3>) -> Result<(Tensor<1>, T)>,
) -> Result<(f64, GradientsParams, T)> {
    let x0 = llava.input_embeds(input)?;
    let positions = llava.positions(input)?;
    let segments = (!input.segments.is_empty()).then_some(input.segments.as_slice());
    let dec = llava.language_model.decoder();
    let ctx = dec.context(&x0, &positions, &input.attention, segments);
    // forward without autodiff (the inner backend), keeping each block's input
    let inner_ctx = ctx.inner();
    let mut h = x0.clone().inner();
    let mut inputs = Vec::with_capacity(dec.layers.len());
    for layer in &dec.layers {
        inputs.push(h.clone());
        h = layer.valid().forward(h, &inner_ctx, None);
    }
    // final norm and the tail under autodiff from the last block's output
    let last = Tensor::from_inner(h).require_grad();
    let (l, extra) = tail(dec.norm.forward(last.clone()))?;
    let value = l.clone().into_scalar::<f32>() as f64;
    let grads = l.backward();
    let mut dy = last.grad(&grads);
    let mut acc = GradientsAccumulator::<M>::new();
    acc.accumulate(module, GradientsParams::from_grads(grads, module));
    for (layer, x) in dec.layers.iter().zip(inputs).rev() {
        let Some(g) = dy else { break };
        let x = Tensor::from_inner(x).require_grad();
        let y = layer.forward(x.clone(), &ctx, None);
        let grads = (y * Tensor::from_inner(g)).sum().backward();
        dy = x.grad(&grads);
        acc.accumulate(module, GradientsParams::from_grads(grads, module));
    }
    if let Some(g) = dy.filter(|_| x0.is_tracked()) {
        let grads = (x0 * Tensor::from_inner(g)).sum().backward();
        acc.accumulate(module, GradientsParams::from_grads(grads, module));
    }
    Ok((value, acc.grads(), extra))
}

fn default_train(kind: &str, adapter: Option<&Adapter>) -> Vec<Part> {
    if let Some(a) = adapter {
        // LLaVA's LoRA recipe: adapters on the LLM, the connector trained in full.
        return [Part::Connector]
            .into_iter()
            .filter(|p| !a.parts.iter().any(|a| a == p.name()))
            .collect();
    }
    match kind {
        "align" => vec![Part::Connector],
        "instruct" => vec![Part::Connector, Part::Llm],
        _ => vec![Part::Encoder, Part::Connector, Part::Llm],
    }
}

/// The stage's adapters: where they are, and which parts train in full beside them (PEFT's modules_to_save).
struct Adapted<'a> {
    spec: &'a Adapter,
    targets: Vec<lora::Linear>,
    to_save: Vec<String>,
}

impl Adapted<'_> {
    /// Saves the adapter (PEFT layout) into `out`, naming `base` (where the unmerged model was saved).
    fn save(&self, model: &Llava, base: &Path, out: &Path) -> Result<()> {
        peft::save(model, self.spec, &self.targets, &self.to_save, base, out)
    }
}

/// Held-out loss (mean per supervised token) over the stage's eval split.
fn eval_loss(
    model: &Llava,
    data: &Prepared,
    pad: i64,
    images: &ImageProcessor,
    device: &Device,
    micro: usize,
) -> Result<f64> {
    let m = model.valid();
    let chunks: Vec<_> = data.encoded.chunks(micro).collect();
    // [summed loss, supervised tokens]; data parallel: each rank takes every N-th micro-batch, the sums are reduced
    let mut sums = [0.0f64; 2];
    for i in crate::dist::shard(chunks.len()) {
        let refs: Vec<_> = chunks[i].iter().collect();
        let mb = loader::micro_batch(&refs, pad, images);
        let l: f32 = micro_loss(&m, &mb, &device.clone().inner())?.into_scalar::<f32>();
        sums[0] += l as f64;
        sums[1] += mb.supervised as f64;
    }
    crate::dist::sum_f64(&mut sums, "the held-out loss all-reduce");
    Ok(sums[0] / sums[1].max(1.0))
}

/// Runs one training stage from `built` (or from the checkpoint in `resume`), returns the trained model.
pub fn run(ctx: StageRun, mut built: Built, resume: Option<PathBuf>) -> Result<Built> {
    let kind = ctx.spec.kind();
    let spec = ctx.spec.train().ok_or_else(|| {
        Error::input(format!(
            "stages.{}: not an align/instruct/pretrain stage",
            ctx.name
        ))
    })?;
    let mut eng = Engine::new(ctx, &built.text)?;
    let (name, seed) = (eng.name, eng.seed);
    let template = eng.template.clone();
    // each split lists its own bad samples (the held-out split's never overwrite the training split's)
    let prep = |data: &crate::recipe::schema::DataSpec, list: &str, key: &str| {
        prepare::prepare(
            data,
            &built.text,
            &template,
            spec.max_len,
            seed,
            spec.on_bad_sample,
            &eng.dir,
            list,
            key,
        )
    };
    let data = prep(&spec.data, "skipped.jsonl", &format!("stages.{name}.data"))?;
    let eval_data = match &spec.eval {
        Some(e) => {
            let mut d = prep(
                &e.data,
                "skipped-eval.jsonl",
                &format!("stages.{name}.eval.data"),
            )?;
            d.encoded.truncate(e.max_samples);
            Some((e.every, d))
        }
        None => None,
    };
    if spec.batch.global % spec.batch.micro != 0 || spec.batch.micro == 0 {
        return Err(Error::input(format!(
            "stages.{name}.batch: global {} is not a multiple of micro {}",
            spec.batch.global, spec.batch.micro
        )));
    }
    // data parallel: each rank takes whole micro-batches of every global batch, so the global batch must split
    // into a multiple of the ranks (packed rows vary in number per step and are shared out as they come)
    let ranks = crate::dist::world().size;
    if !spec.pack && (spec.batch.global / spec.batch.micro) % ranks != 0 {
        return Err(Error::input(format!(
            "stages.{name}.batch: global {} in micro-batches of {} makes {} per step, which {ranks} ranks cannot \
             share evenly; {}",
            spec.batch.global,
            spec.batch.micro,
            spec.batch.global / spec.batch.micro,
            match (1..=spec.batch.global)
                .rev()
                .find(|m| spec.batch.global % m == 0 && (spec.batch.global / m) % ranks == 0)
            {
                Some(m) => format!("set micro = {m}"),
                None => format!("make global a multiple of {ranks}"),
            }
        )));
    }
    let order = Arc::new(Order {
        mix: spec.data.mix,
        global: spec.batch.global,
        seed,
        sources: data.by_source.clone(),
        has_image: data.encoded.iter().map(|e| !e.images.is_empty()).collect(),
        len: data.encoded.iter().map(|e| e.ids.len()).collect(),
    });
    let per_epoch = order.steps_per_epoch();
    let total = spec
        .max_steps
        .unwrap_or((spec.epochs * per_epoch as f64).floor() as usize);
    if total == 0 {
        return Err(Error::input(format!(
            "stages.{name}: {} usable samples make no full global batch of {}; lower batch.global or add data",
            data.encoded.len(),
            spec.batch.global
        )));
    }

    if spec.pack && (built.model.spec.anyres.is_some() || built.model.spec.native.is_some()) {
        return Err(Error::input(format!(
            "stages.{name}.pack: sequence packing takes models with a fixed number of tokens per image (LLaVA-1.5 \
             layout); this model tiles images (AnyRes) or uses M-RoPE positions: set pack = false"
        )));
    }

    // Which parameters learn; with adapters, the adapters too (attached before resume: their ids are saved).
    let mut train = eng.train(&default_train(kind, spec.adapter.as_ref()));
    let mut model = built.model;
    let adapted = match &spec.adapter {
        Some(a) => {
            let targets = lora::resolve(&model, a, &format!("stages.{name}.adapter"))?;
            model = lora::attach(model, a, &targets, eng.device)?;
            if let Some(ck) = &resume {
                model = peft::load(model, &ck.join("adapter"), &targets, eng.device)?;
            }
            let to_save = train.clone();
            train.push(r"re:\.lora\.[ab]$".into());
            Some(Adapted {
                spec: a,
                targets,
                to_save,
            })
        }
        None => None,
    };
    let mut model = eng.start(
        model,
        total,
        resume.as_deref(),
        &train,
        &format!(
            "{kind}: {} samples, {per_epoch} steps/epoch",
            data.encoded.len()
        ),
    )?;

    // a sample whose media fail to decode mid-run (changed on disk since the checks) follows the stage's policy
    let origins: Vec<String> = data.samples.iter().map(|s| s.origin.clone()).collect();
    let rx = loader::prefetch(
        order,
        Arc::new(data.encoded),
        Arc::new(built.images.clone()),
        spec.batch.micro,
        built.text.pad_id(),
        spec.pack.then_some(spec.max_len),
        eng.first,
        total,
        4,
    );
    // Every save (checkpoints, the stage's model, a released part) carries tokenizer, processor and template.
    let save = |m: &Llava, part, out: &std::path::Path| {
        export(m, &built.text, &built.processor, Some(&template), part, out)
    };
    let clock = Instant::now();
    let mut tokens_since = 0usize;
    for (step, mut micros) in rx {
        eng.begin(step);
        for mb in &mut micros {
            let dropped = std::mem::take(&mut mb.dropped);
            let bad: Vec<Bad> = dropped
                .into_iter()
                .map(|(i, why)| {
                    let at = origins
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("sample {i}"));
                    Bad::new(at, Kind::UnreadableMedia, why)
                })
                .collect();
            if !bad.is_empty() {
                contract::settle_late(
                    &bad,
                    spec.on_bad_sample,
                    &eng.dir.join("skipped.jsonl"),
                    &format!("stages.{name} step {}", step + 1),
                )?;
            }
        }
        micros.retain(|mb| !mb.ids.is_empty());
        let global_sup: usize = micros.iter().map(|m| m.supervised).sum();
        let mut acc = GradientsAccumulator::<Llava>::new();
        let norm = global_sup.max(1) as f64;
        // [loss, tokens, real tokens] of this rank's micro-batches (all of them in one process)
        let mut sums = [0.0f64; 3];
        for i in crate::dist::shard(micros.len()) {
            let mb = &micros[i];
            let (v, g) = micro_grads(&model, mb, eng.device, norm, spec.checkpoint_activations)?;
            sums[0] += v;
            sums[1] += mb.tokens as f64;
            sums[2] += mb.real as f64;
            acc.accumulate(&model, g);
        }
        let grads = eng.all_reduce(&model, acc.grads(), &mut sums);
        let (loss_val, tokens, real) = (sums[0], sums[1] as usize, sums[2] as usize);
        let norm;
        (model, norm) = eng.update(model, step, loss_val, grads)?;
        tokens_since += tokens;
        let secs = clock.elapsed().as_secs_f64().max(1e-9);
        eng.end(
            &model,
            step,
            loss_val,
            norm,
            Some(tokens as f64 / eng.step_secs()),
            || {
                serde_json::json!({
                    "loss": loss_val, "tokens_per_s": tokens_since as f64 / secs,
                    "supervised_tokens": global_sup,
                    // share of the computed tokens that are padding (pack = true lowers it)
                    "padding": 1.0 - real as f64 / tokens.max(1) as f64,
                })
            },
            |tmp| match &adapted {
                // base weights (HF files skip adapters) + the adapter, as the resume above reads them
                Some(a) => {
                    save(&model, None, tmp)?;
                    a.save(&model, tmp, &tmp.join("adapter"))
                }
                None => save(&model, None, tmp),
            },
        )?;
        let done = step + 1;
        if let Some((every, ed)) = &eval_data
            && (done % every == 0 || done == total)
        {
            let el = eval_loss(
                &model,
                ed,
                built.text.pad_id(),
                &built.images,
                eng.device,
                spec.batch.micro,
            )?;
            eng.note(&format!("step {done}: held-out loss {el:.4}"));
            eng.metrics
                .write(serde_json::json!({"stage": name, "step": done, "eval_loss": el}))?;
        }
    }
    let part = spec.export.as_ref().map(|e| {
        let p = match e.part {
            crate::recipe::schema::ExportPart::Encoder => crate::checkpoint::hf::Part::Encoder,
            crate::recipe::schema::ExportPart::Llm => crate::checkpoint::hf::Part::Llm,
        };
        (p, crate::checkpoint::safetensors_io::store_dtype(e.dtype))
    });
    // The stage's model: the full LLaVA directory, plus the released part when the recipe asks for one.
    // With adapters: `model/` holds them merged (what later stages, generate and transformers load), `adapter/`
    // the PEFT adapter over `base/` (the unmerged weights).
    built.model = eng.finish(|dir| {
        let m = match &adapted {
            Some(a) => {
                let base = dir.join("base");
                save(&model, None, &base)?;
                a.save(&model, &base, &dir.join("adapter"))?;
                lora::merge(model)
            }
            None => model,
        };
        save(&m, None, &dir.join("model"))?;
        if let Some(p) = part {
            save(&m, Some(p), &dir.join("export"))?;
        }
        Ok(m)
    })?;
    Ok(built)
}
