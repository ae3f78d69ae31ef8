//! The loop of align, instruct and pretrain, run through the step engine (`steps::Engine`): forward, masked
//! cross-entropy, backward, accumulate micro-batches (averaging over the global batch's supervised tokens); the
//! engine clips, steps AdamW per parameter group on the schedule, logs and checkpoints. Checkpoints hold everything
//! an exact resume needs (weights, optimizer moments, parameter ids, step); the data order and learning rate are
//! pure functions of the step, so nothing else is state.
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::backward::{hidden_backward, to_input};
use super::loss;
use super::steps::{Engine, Micro, StageRun};
use crate::data::contract::{self, Bad, Kind};
use crate::data::images::ImageProcessor;
use crate::data::loader::{self, MicroBatch, Order};
use crate::data::prepare::{self, Prepared};
use crate::error::{Error, Result};
use crate::model::{Built, export};
use crate::zoo::mllm::Llava;
use crate::zoo::parts::Part;

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

/// The parts that learn when the recipe names none (with adapters: `adapters::default_parts`).
fn default_train(kind: &str) -> Vec<Part> {
    match kind {
        "align" => vec![Part::Connector],
        "instruct" => vec![Part::Connector, Part::Llm],
        _ => vec![Part::Encoder, Part::Connector, Part::Llm],
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

    let pack = super::batches::pack_cap(spec.pack, spec.max_len, &built.model, &eng.key)?;

    // Which parameters learn in full (the engine attaches adapters and trains them too)
    let train = eng.train(&default_train(kind));
    let mut model = eng.start(
        built.model,
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
        pack,
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
        let norm = global_sup.max(1) as f64;
        let (ckpt, device) = (spec.checkpoint_activations, eng.device);
        // numbers summed over the step: [tokens, real tokens]
        let up = eng.accumulate(model, step, micros.len(), 2, |i, m| {
            let mb = &micros[i];
            let (loss, grads) = micro_grads(m, mb, device, norm, ckpt)?;
            let sums = vec![mb.tokens as f64, mb.real as f64];
            Ok(Micro { loss, grads, sums })
        })?;
        let (loss_val, tokens, real) = (up.loss, up.sums[0] as usize, up.sums[1] as usize);
        model = up.model;
        tokens_since += tokens;
        let secs = clock.elapsed().as_secs_f64().max(1e-9);
        eng.end(
            &model,
            step,
            loss_val,
            up.norm,
            Some(tokens as f64 / eng.step_secs()),
            || {
                serde_json::json!({
                    "loss": loss_val, "tokens_per_s": tokens_since as f64 / secs,
                    "supervised_tokens": global_sup,
                    // share of the computed tokens that are padding (pack = true lowers it)
                    "padding": 1.0 - real as f64 / tokens.max(1) as f64,
                })
            },
            |tmp| save(&model, None, tmp),
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
    // The stage's model: the full LLaVA directory (with adapters, merged, beside `adapter/` over `base/`), plus
    // the released part when the recipe asks for one.
    built.model = eng.finish_model(
        model,
        |m, out| save(m, None, out),
        |m, dir| match part {
            Some(p) => save(m, Some(p), &dir.join("export")),
            None => Ok(()),
        },
    )?;
    Ok(built)
}
