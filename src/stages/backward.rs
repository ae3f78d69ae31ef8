//! The backward pass every training stage takes from the LLM's final hidden states: the loader's micro-batch as the
//! model's input (`to_input`), then one plain backward pass of `tail(hidden)`, or, with `checkpoint_activations`,
//! a forward without autodiff that keeps only each LLM block's input and a backward that reruns one block at a
//! time from the last (transformers' `gradient_checkpointing_enable()`).
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};

use crate::data::loader::MicroBatch;
use crate::error::{Error, Result};
use crate::zoo::layers::float_tensor;
use crate::zoo::mllm::{Llava, Media, MmInput};

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
