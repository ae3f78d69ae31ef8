//! What the ViT families share below their module names: the patch embedding (a conv with kernel = stride = patch,
//! as a matmul over flattened patches) and the position table resized for another input resolution.
use burn::tensor::Tensor;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

/// pixels [n, c, gh·p, gw·p] through a conv weight [d, c, p, p] (+ bias [d]) -> [n, gh·gw, d], patches row-major.
pub fn embed_patches(
    pixels: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    p: usize,
) -> Tensor<3> {
    let [n, c, hh, ww] = pixels.dims();
    let d = weight.dims()[0];
    let (gh, gw) = (hh / p, ww / p);
    // Patchify in the conv weight's (c, p, p) order: [n, c, gh, p, gw, p] -> [n, gh, gw, c, p, p].
    let patches = pixels
        .reshape([n, c, gh, p, gw, p])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([n * gh * gw, c * p * p]);
    let mut x = patches.matmul(weight.reshape([d, c * p * p]).transpose());
    if let Some(b) = bias {
        x = x + b.unsqueeze::<2>();
    }
    x.reshape([n, gh * gw, d])
}

/// A position table [prefix + g0², d] (prefix rows: CLS) for a gh×gw grid: unchanged at the trained grid,
/// otherwise its patch rows resized bicubically (align_corners=False) as transformers' `interpolate_pos_encoding`.
pub fn resize_positions(table: Tensor<2>, prefix: usize, gh: usize, gw: usize) -> Tensor<2> {
    let [n_pos, d] = table.dims();
    let g0 = ((n_pos - prefix) as f64).sqrt() as usize;
    if g0 == gh && g0 == gw {
        return table;
    }
    let grid = table
        .clone()
        .slice([prefix..n_pos, 0..d])
        .reshape([1, g0, g0, d])
        .permute([0, 3, 1, 2]);
    let grid = interpolate(
        grid,
        InterpolateOptions {
            mode: InterpolateMode::Bicubic,
            align_corners: false,
            output_size: Some([gh, gw]),
            scale_factor: None,
        },
    )
    .permute([0, 2, 3, 1])
    .reshape([gh * gw, d]);
    if prefix == 0 {
        grid
    } else {
        Tensor::cat(vec![table.slice([0..prefix, 0..d]), grid], 0)
    }
}

/// hidden_states[0..=last] of a stack of blocks: the embedding output, then each of the first `last` blocks'
/// outputs (transformers' `output_hidden_states`; feature selection indexes into it).
pub fn hidden_states<L>(
    embedded: Tensor<3>,
    layers: &[L],
    last: usize,
    forward: impl Fn(&L, Tensor<3>) -> Tensor<3>,
) -> Vec<Tensor<3>> {
    let mut states = vec![embedded];
    for layer in layers.iter().take(last) {
        let next = forward(layer, states.last().unwrap().clone());
        states.push(next);
    }
    states
}
