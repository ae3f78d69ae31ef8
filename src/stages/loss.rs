//! Pure loss functions shared by the stages.
use burn::tensor::activation::log_softmax;
use burn::tensor::{IndexingUpdateOp, Tensor};

use crate::zoo::layers::{float_tensor, int_tensor, logprob};

/// Summed next-token cross-entropy over supervised positions, from the LLM's final hidden states [b, t, d] and
/// its LM head (`head`: [1, n, d] -> [1, n, v]): position i predicts ids[:, i+1] where labels[:, i+1] is true.
/// Returns the sum (the caller divides by the global batch's supervised-token count, so accumulated micro-batches
/// average exactly as one big batch would; HF's `num_items_in_batch`).
pub fn masked_ce_sum(
    hidden: Tensor<3>,
    head: impl Fn(Tensor<3>) -> Tensor<3>,
    ids: &[Vec<i64>],
    labels: &[Vec<bool>],
) -> Tensor<1> {
    supervised_logp_rows(hidden, head, ids, labels).sum().neg()
}

/// Per-row summed log-probability of the supervised next tokens [b], like `masked_logp_rows`, but the LM head
/// and the log-softmax run only at the n positions whose next token is a target: [n, v] logits instead of
/// [b, t, v]. Image tokens, prompts and padding are never scored — in LLaVA's alignment stage 60% of a row is image
/// placeholders, and the [tokens × vocab] logits and their gradient are the largest tensors of a step. Same
/// value as the full-logits path up to summation order (transformers computes every position and masks).
pub fn supervised_logp_rows(
    hidden: Tensor<3>,
    head: impl Fn(Tensor<3>) -> Tensor<3>,
    ids: &[Vec<i64>],
    labels: &[Vec<bool>],
) -> Tensor<1> {
    let b = hidden.dims()[0];
    supervised_logp_by(hidden, head, ids, labels, |r, _| r, b)
}

/// `supervised_logp_rows` summed per sequence instead of per row, for packed rows: `owner(r, i)` names the
/// sequence (of `n_out`) that token i of row r belongs to, asked for each supervised token. [n_out]
pub fn supervised_logp_by(
    hidden: Tensor<3>,
    head: impl Fn(Tensor<3>) -> Tensor<3>,
    ids: &[Vec<i64>],
    labels: &[Vec<bool>],
    owner: impl Fn(usize, usize) -> usize,
    n_out: usize,
) -> Tensor<1> {
    let [b, t, _] = hidden.dims();
    let device = hidden.device();
    let sel = Supervised::of(ids, labels, t);
    let n = sel.at.len();
    if n == 0 {
        // nothing supervised: zero, still connected to the graph so a backward pass finds its way
        return hidden
            .slice([0..b, 0..1, 0..1])
            .reshape([b])
            .sum()
            .mul_scalar(0.0)
            .repeat_dim(0, n_out);
    }
    let (logp, _) = sel.logps(hidden, head, false);
    // each sequence's sum: a [n_out, n] 0/1 matrix times the picked log-probs
    let mut onehot = vec![0.0f32; n_out * n];
    for (j, &at) in sel.at.iter().enumerate() {
        let (r, i) = (at as usize / t, at as usize % t);
        onehot[owner(r, i + 1) * n + j] = 1.0;
    }
    float_tensor(onehot, [n_out, n], &device)
        .matmul(logp.unsqueeze_dim(1))
        .reshape([n_out])
}

/// Per-token log-probs of the supervised next tokens, laid out as `token_logps` lays them ([b, t-1], position i
/// scoring ids[:, i+1]) with 0 wherever labels[:, i+1] is false; with `entropy`, each supervised position's
/// next-token entropy (0 elsewhere). The LM head runs at the supervised positions only: the RL stages mask every
/// other position out, and a rollout's prompt and image tokens are most of its row.
pub fn supervised_token_logps(
    hidden: Tensor<3>,
    head: impl Fn(Tensor<3>) -> Tensor<3>,
    ids: &[Vec<i64>],
    labels: &[Vec<bool>],
    entropy: bool,
) -> (Tensor<2>, Option<Tensor<2>>) {
    let [b, t, _] = hidden.dims();
    let device = hidden.device();
    let sel = Supervised::of(ids, labels, t);
    let n = sel.at.len();
    if n == 0 {
        let zero = hidden
            .slice([0..b, 0..t - 1, 0..1])
            .reshape([b, t - 1])
            .mul_scalar(0.0);
        return (zero.clone(), entropy.then_some(zero));
    }
    // position r·t + i of the hidden states is entry r·(t-1) + i of the [b, t-1] layout
    let to: Vec<i64> = sel.at.iter().map(|&a| a - a / t as i64).collect();
    let to = int_tensor(to, [n], &device);
    let place = |x: Tensor<1>| {
        Tensor::<1>::zeros([b * (t - 1)], &device)
            .select_assign(0, to.clone(), x, IndexingUpdateOp::Add)
            .reshape([b, t - 1])
    };
    let (logp, ent) = sel.logps(hidden, head, entropy);
    (place(logp), ent.map(place))
}

/// The positions whose next token is supervised: flat indices r·t + i into [b·t] where labels[r][i+1], and the
/// target ids[r][i+1] of each.
struct Supervised {
    at: Vec<i64>,
    targets: Vec<i64>,
}

impl Supervised {
    fn of(ids: &[Vec<i64>], labels: &[Vec<bool>], t: usize) -> Self {
        let (mut at, mut targets) = (vec![], vec![]);
        for (r, (ids, labels)) in ids.iter().zip(labels).enumerate() {
            for i in 0..t - 1 {
                if labels[i + 1] {
                    at.push((r * t + i) as i64);
                    targets.push(ids[i + 1]);
                }
            }
        }
        Supervised { at, targets }
    }

    /// The LM head and log-softmax at the n selected positions: the targets' log-probs [n] and, with `entropy`,
    /// each position's entropy [n]. At least one position must be selected.
    fn logps(
        &self,
        hidden: Tensor<3>,
        head: impl Fn(Tensor<3>) -> Tensor<3>,
        entropy: bool,
    ) -> (Tensor<1>, Option<Tensor<1>>) {
        let [b, t, d] = hidden.dims();
        let device = hidden.device();
        let n = self.at.len();
        let picked: Tensor<2> = hidden
            .reshape([b * t, d])
            .select(0, int_tensor(self.at.clone(), [n], &device));
        let logits = head(picked.unsqueeze_dim(0)).squeeze_dim::<2>(0); // [n, v]
        if !entropy {
            // fused on the CPU backend: the [n, v] log-softmax and its gradient never materialise
            if let Some(logp) = logprob::target_logprobs(&logits, &self.targets) {
                return (logp, None);
            }
        }
        let logp = log_softmax(logits, 1);
        let ent = entropy.then(|| {
            (logp.clone().exp() * logp.clone())
                .sum_dim(1)
                .reshape([n])
                .neg()
        });
        let targets = int_tensor(self.targets.clone(), [n, 1], &device);
        (logp.gather(1, targets).reshape([n]), ent)
    }
}

/// Per-row summed log-probability of the supervised next tokens from full logits [b, t, v]: [b]. The stages use
/// `supervised_logp_rows`; this is the straightforward form (transformers' own) the tests hold it to.
#[cfg(test)]
pub fn masked_logp_rows(logits: Tensor<3>, ids: &[Vec<i64>], labels: &[Vec<bool>]) -> Tensor<1> {
    let (picked, _) = token_logps(logits, ids, false);
    let mask = target_mask(labels, &picked.device());
    (picked * mask).sum_dim(1).squeeze_dim(1)
}

/// Log-prob of each next token: [b, t-1] (position i scores ids[:, i+1]); with `entropy`, also the entropy of
/// each next-token distribution [b, t-1]. The reference for `supervised_token_logps` (tests).
#[cfg(test)]
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
    let targets: Tensor<3, burn::tensor::Int> =
        int_tensor(targets, [b, t - 1], &device).unsqueeze_dim(2);
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    /// Random hidden states [b, t, d] (tracked), a linear head [d, v] and ids [b, t] that vary with `step`.
    fn case(
        seed: u64,
        [b, t, d, v]: [usize; 4],
        step: usize,
    ) -> (Tensor<3>, Tensor<2>, Vec<Vec<i64>>) {
        let device = Device::flex().autodiff();
        device.seed(seed);
        let hidden: Tensor<3> =
            Tensor::random([b, t, d], Distribution::Default, &device).require_grad();
        let w: Tensor<2> = Tensor::random([d, v], Distribution::Default, &device);
        let ids = (0..b)
            .map(|r| (0..t).map(|i| ((r * 5 + i * step) % v) as i64).collect())
            .collect();
        (hidden, w, ids)
    }

    /// hidden [x, y, d] -> logits [x, y, v] through `w`.
    fn head(w: &Tensor<2>) -> impl Fn(Tensor<3>) -> Tensor<3> + '_ {
        move |h: Tensor<3>| {
            let [x, y, d] = h.dims();
            let v = w.dims()[1];
            h.reshape([x * y, d]).matmul(w.clone()).reshape([x, y, v])
        }
    }

    /// The hidden states' gradients under both backward passes: nonzero and within 1e-5.
    fn same_hidden_grads(hidden: &Tensor<3>, a: Tensor<1>, b: Tensor<1>) {
        let (ga, gb) = (
            crate::zoo::layers::to_vec(hidden.grad(&a.backward()).unwrap()),
            crate::zoo::layers::to_vec(hidden.grad(&b.backward()).unwrap()),
        );
        assert!(ga.iter().any(|x| x.abs() > 1e-3));
        for (x, y) in ga.iter().zip(&gb) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    /// The LM head on supervised positions only gives the full-logits path's row sums, and the same gradient
    /// with respect to the hidden states.
    #[test]
    fn supervised_rows_equal_full_logits() {
        let t = 7;
        let (hidden, w, ids) = case(3, [3, t, 5, 11], 3);
        let head = head(&w);
        // row 0: tail supervised, row 1: scattered, row 2: nothing
        let labels = vec![
            vec![false, false, false, true, true, true, true],
            vec![false, true, false, true, false, false, true],
            vec![false; t],
        ];
        let full = masked_logp_rows(head(hidden.clone()), &ids, &labels);
        let fast = supervised_logp_rows(hidden.clone(), head, &ids, &labels);
        let (a, c) = (
            crate::zoo::layers::to_vec(full.clone()),
            crate::zoo::layers::to_vec(fast.clone()),
        );
        for (x, y) in a.iter().zip(&c) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {c:?}");
        }
        assert_eq!(c[2], 0.0);
        same_hidden_grads(&hidden, full.sum(), fast.sum());
    }

    /// The per-token form (RL stages): supervised positions equal the full-logits path's log-probs and entropies,
    /// the rest are 0, and the hidden-state gradient of a masked weighted sum is the same.
    #[test]
    fn supervised_tokens_equal_full_logits() {
        let (b, t) = (2, 6);
        let (hidden, w, ids) = case(5, [b, t, 4, 9], 5);
        let device = hidden.device();
        let head = head(&w);
        let labels = vec![
            vec![false, false, true, true, false, true],
            vec![false, false, false, false, true, true],
        ];
        let mask = target_mask(&labels, &device);
        let (full, full_ent) = token_logps(head(hidden.clone()), &ids, true);
        let (fast, fast_ent) = supervised_token_logps(hidden.clone(), head, &ids, &labels, true);
        let vals = |x: Tensor<2>| crate::zoo::layers::to_vec(x);
        let m = vals(mask.clone());
        for (full, fast) in [
            (full.clone(), fast.clone()),
            (full_ent.unwrap(), fast_ent.unwrap()),
        ] {
            let (a, c) = (vals(full), vals(fast));
            for ((x, y), m) in a.iter().zip(&c).zip(&m) {
                let want = if *m > 0.0 { *x } else { 0.0 };
                assert!((want - y).abs() < 1e-5, "{a:?} vs {c:?}");
            }
        }
        let weights: Tensor<2> = Tensor::random([b, t - 1], Distribution::Default, &device);
        same_hidden_grads(
            &hidden,
            (full * mask * weights.clone()).sum(),
            (fast * weights).sum(),
        );
    }
}
