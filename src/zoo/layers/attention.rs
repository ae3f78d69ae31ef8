//! Scaled dot-product attention over [b, h, t, d] with an explicit boolean mask (true = masked), so causal,
//! padding and KV-cache offsets are one mechanism. Grouped-query attention follows transformers' `repeat_kv` order
//! (query head i reads KV head i / n_rep): `attend_grouped` without copying K/V, `repeat_kv` where a caller needs
//! the heads repeated.
use burn::tensor::module::attention as sdpa;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use super::flash;

/// [b, kv_heads, t, d] -> [b, kv_heads * n_rep, t, d]
pub fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n_rep, t, d])
        .reshape([b, kvh * n_rep, t, d])
}

/// Mask for queries at positions `past..past+tq` over keys `0..past+tq`: [b, 1, tq, tk], true = masked.
/// `key_valid[b][k]` is false for padding keys; `causal` hides keys after the query; `segments[b][k]` (packed
/// rows, no past) hides keys of another sample (block-diagonal).
pub fn build_mask(
    key_valid: &[Vec<bool>],
    tq: usize,
    causal: bool,
    segments: Option<&[Vec<u32>]>,
    device: &Device,
) -> Tensor<4, Bool> {
    let b = key_valid.len();
    let tk = key_valid[0].len();
    let past = tk - tq;
    let mut m = Vec::with_capacity(b * tq * tk);
    for (r, row) in key_valid.iter().enumerate() {
        let seg = segments.map(|s| &s[r]);
        for q in 0..tq {
            for (k, valid) in row.iter().enumerate() {
                let other = seg.is_some_and(|s| s[k] != s[past + q]);
                m.push(!valid || other || (causal && k > past + q));
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [b, 1, tq, tk]), device)
}

/// softmax(q kᵀ · scale, masked) v. q: [b, h, tq, d], k/v: [b, h, tk, d], mask: [b, 1, tq, tk].
/// Fully masked rows (left padding) give zeros rather than NaN.
pub fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<&Tensor<4, Bool>>,
) -> Tensor<4> {
    if let Some(o) = flash::attend(&q, &k, &v, mask) {
        return o;
    }
    burn_attend(q, k, v, mask)
}

/// burn's attention (materialised under autodiff): the path on other devices and dtypes, and the tests' reference.
pub fn burn_attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<&Tensor<4, Bool>>,
) -> Tensor<4> {
    let [b, h, tq, _] = q.dims();
    let tk = k.dims()[2];
    // Expanded explicitly: the autodiff fallback's mask_fill is not documented to broadcast.
    let mask = mask.map(|m| m.clone().expand([b, h, tq, tk]));
    sdpa(
        q,
        k,
        v,
        mask,
        None,
        AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        },
    )
}

/// Grouped-query attention without repeating K/V in memory: q [b, h, tq, d], k/v [b, kvh, tk, d] with
/// h = kvh · g, mask [b, 1, tq, tk]. The g query heads that read one KV head (heads kvh_i·g .. kvh_i·g + g, as in
/// `repeat_kv`) are stacked along the query axis, so each KV head is multiplied once by a [g·tq, d] block: the
/// same dot products as the repeated form, without the [b, h, tk, d] copies forward or their sum backward.
pub fn attend_grouped(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: &Tensor<4, Bool>,
) -> Tensor<4> {
    let [b, h, tq, d] = q.dims();
    let [_, kvh, tk, _] = k.dims();
    if let Some(o) = flash::attend(&q, &k, &v, Some(mask)) {
        return o; // grouped natively
    }
    if h == kvh {
        return burn_attend(q, k, v, Some(mask));
    }
    let g = h / kvh;
    let q = q.reshape([b, kvh, g * tq, d]);
    let mask = mask
        .clone()
        .unsqueeze_dim::<5>(1) // [b, 1, 1, tq, tk]
        .expand([b, kvh, g, tq, tk])
        .reshape([b, kvh, g * tq, tk]);
    burn_attend(q, k, v, Some(&mask)).reshape([b, h, tq, d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn close<const D: usize>(a: Tensor<D>, b: Tensor<D>) {
        let (a, b) = (super::super::to_vec(a), super::super::to_vec(b));
        assert!(a.iter().any(|x| x.abs() > 1e-4));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
        }
    }

    /// Stacking a KV head's query heads gives the repeated form's outputs and gradients (causal, a padded key, and
    /// a KV-cache offset: 5 queries over 7 keys).
    #[test]
    fn grouped_attention_matches_repeated_heads() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let (b, h, kvh, tq, tk, d) = (2, 6, 2, 5, 7, 4);
        let q: Tensor<4> =
            Tensor::random([b, h, tq, d], Distribution::Default, &device).require_grad();
        let k: Tensor<4> =
            Tensor::random([b, kvh, tk, d], Distribution::Default, &device).require_grad();
        let v: Tensor<4> =
            Tensor::random([b, kvh, tk, d], Distribution::Default, &device).require_grad();
        let mut valid = vec![vec![true; tk]; b];
        valid[1][0] = false;
        let mask = build_mask(&valid, tq, true, None, &device);
        let weights: Tensor<4> = Tensor::random([b, h, tq, d], Distribution::Default, &device);
        let grouped = attend_grouped(q.clone(), k.clone(), v.clone(), &mask);
        let repeated = attend(
            q.clone(),
            repeat_kv(k.clone(), h / kvh),
            repeat_kv(v.clone(), h / kvh),
            Some(&mask),
        );
        close(repeated.clone(), grouped.clone());
        let gg = (grouped * weights.clone()).sum().backward();
        let gr = (repeated * weights).sum().backward();
        close(q.grad(&gr).unwrap(), q.grad(&gg).unwrap());
        close(k.grad(&gr).unwrap(), k.grad(&gg).unwrap());
        close(v.grad(&gr).unwrap(), v.grad(&gg).unwrap());
    }
}
