//! Scaled dot-product attention over [b, h, t, d] with an explicit boolean mask (true = masked), so causal,
//! padding and KV-cache offsets are one mechanism. Grouped-query attention repeats KV heads as transformers'
//! `repeat_kv` does (query head i reads KV head i / n_rep).
use burn::tensor::module::attention as sdpa;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData};

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
