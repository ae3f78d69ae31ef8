//! Pure loss functions shared by the stages.
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

use crate::zoo::layers::{float_tensor, int_tensor};

/// Summed next-token cross-entropy over supervised positions: logits [b, t, v] predict ids[:, 1:] where
/// labels[:, 1:] is true. Returns the sum (the caller divides by the global batch's supervised-token count, so
/// accumulated micro-batches average exactly as one big batch would; HF's `num_items_in_batch`).
pub fn masked_ce_sum(logits: Tensor<3>, ids: &[Vec<i64>], labels: &[Vec<bool>]) -> Tensor<1> {
    masked_logp_rows(logits, ids, labels).sum().neg()
}

/// Per-row summed log-probability of the supervised next tokens: [b]. The sequence log-prob of a response
/// (DPO, reward margins, policy gradients) is its row here.
pub fn masked_logp_rows(logits: Tensor<3>, ids: &[Vec<i64>], labels: &[Vec<bool>]) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    let device = logits.device();
    let logp = log_softmax(logits.slice([0..b, 0..t - 1, 0..v]), 2);
    let targets: Vec<i64> = ids.iter().flat_map(|r| r[1..].iter().copied()).collect();
    let mask: Vec<f32> = labels
        .iter()
        .flat_map(|r| r[1..].iter().map(|&l| if l { 1.0 } else { 0.0 }))
        .collect();
    let targets: Tensor<3, Int> = int_tensor(targets, [b, t - 1], &device).unsqueeze_dim(2);
    let mask: Tensor<2> = float_tensor(mask, [b, t - 1], &device);
    let picked: Tensor<2> = logp.gather(2, targets).squeeze_dim(2);
    (picked * mask).sum_dim(1).squeeze_dim(1)
}
