//! Autoregressive decoding with a KV cache: one prefill over the prompt (images included), then one token per
//! step. Greedy at temperature 0; otherwise temperature + nucleus (top-p) sampling with a seeded RNG, as
//! transformers' `generate(do_sample=True, temperature, top_p)`. Log-probs are of the unscaled model distribution.
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::zoo::layers::{int_tensor, to_vec};
use crate::zoo::llms::KvCache;
use crate::zoo::mllm::{Llava, MmInput};

#[derive(Debug, Clone)]
pub struct GenConfig {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub eos: Vec<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub output_ids: Vec<i64>,
    pub logprobs: Vec<f64>,
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = logits
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&x| x as f64 - lse).collect()
}

fn choose(logp: &[f64], cfg: &GenConfig, rng: &mut rand::rngs::StdRng) -> usize {
    if cfg.temperature <= 0.0 {
        // first maximum, as torch.argmax
        let mut best = 0;
        for (i, &v) in logp.iter().enumerate() {
            if v > logp[best] {
                best = i;
            }
        }
        return best;
    }
    let scaled: Vec<f64> = logp.iter().map(|l| l / cfg.temperature).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(usize, f64)> = scaled.iter().map(|l| (l - max).exp()).enumerate().collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // nucleus: the smallest prefix whose mass reaches top_p (the crossing token included)
    let mut keep = 0;
    let mut mass = 0.0;
    for p in &probs {
        keep += 1;
        mass += p.1;
        if mass >= cfg.top_p {
            break;
        }
    }
    let kept = &probs[..keep];
    let total: f64 = kept.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f64>() * total;
    for p in kept {
        r -= p.1;
        if r <= 0.0 {
            return p.0;
        }
    }
    kept[keep - 1].0
}

/// Generates for one prompt row; `on_token` sees each id as it is produced (for streaming).
pub fn generate(
    model: &Llava,
    input: MmInput,
    cfg: &GenConfig,
    mut on_token: impl FnMut(i64),
) -> Result<Generated> {
    let device = burn::module::Module::devices(model)[0].clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let t = input.ids[0].len();
    let mut cache = KvCache::default();
    let logits = model.forward_with(&input, &[(0..t as i64).collect()], Some(&mut cache))?;
    let vocab = logits.dims()[2];
    let mut last = to_vec(logits.slice([0..1, t - 1..t, 0..vocab]));
    let mut out = Generated::default();
    let mut valid = input.attention[0].clone();
    for step in 0..cfg.max_new_tokens {
        let logp = log_softmax(&last);
        let next = choose(&logp, cfg, &mut rng);
        out.output_ids.push(next as i64);
        out.logprobs.push(logp[next]);
        on_token(next as i64);
        if cfg.eos.contains(&(next as i64)) || step + 1 == cfg.max_new_tokens {
            break;
        }
        valid.push(true);
        let pos = (t + step) as i64;
        let logits = model.step(
            int_tensor(vec![next as i64], [1, 1], &device),
            &[vec![pos]],
            std::slice::from_ref(&valid),
            &mut cache,
        );
        last = to_vec(logits);
    }
    Ok(out)
}
