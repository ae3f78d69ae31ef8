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
    let (picked, _) = token_logps(logits, ids, false);
    let mask = target_mask(labels, &picked.device());
    (picked * mask).sum_dim(1).squeeze_dim(1)
}

/// Log-prob of each next token: [b, t-1] (position i scores ids[:, i+1]); with `entropy`, also the entropy of
/// each next-token distribution [b, t-1] (policy-gradient stages log it).
pub fn token_logps(
    logits: Tensor<3>,
    ids: &[Vec<i64>],
    entropy: bool,
) -> (Tensor<2>, Option<Tensor<2>>) {
    let [b, t, v] = logits.dims();
    let device = logits.device();
    let logp = log_softmax(logits.slice([0..b, 0..t - 1, 0..v]), 2);
    let ent = entropy.then(|| {
        (logp.clone().exp() * logp.clone())
            .sum_dim(2)
            .squeeze_dim::<2>(2)
            .neg()
    });
    let targets: Vec<i64> = ids.iter().flat_map(|r| r[1..].iter().copied()).collect();
    let targets: Tensor<3, Int> = int_tensor(targets, [b, t - 1], &device).unsqueeze_dim(2);
    (logp.gather(2, targets).squeeze_dim(2), ent)
}

/// 1.0 where the next token is a target (labels[:, 1:]), else 0: [b, t-1].
pub fn target_mask(labels: &[Vec<bool>], device: &burn::tensor::Device) -> Tensor<2> {
    let (b, t) = (labels.len(), labels[0].len());
    let mask: Vec<f32> = labels
        .iter()
        .flat_map(|r| r[1..].iter().map(|&l| if l { 1.0 } else { 0.0 }))
        .collect();
    float_tensor(mask, [b, t - 1], device)
}
