//! Learning-rate schedules as pure functions of the step (so resume needs no scheduler state): linear warmup then
//! constant, linear decay to 0, or cosine decay to `min_lr_ratio` (HF `get_cosine_schedule_with_warmup`).
use crate::recipe::schema::Schedule;

fn warmup(ratio: f64, steps: usize, total: usize) -> usize {
    if steps > 0 {
        steps
    } else {
        (ratio * total as f64).ceil() as usize
    }
}

/// Multiplier of the base learning rate at optimizer step `step` (0-based) of `total`.
pub fn factor(s: &Schedule, step: usize, total: usize) -> f64 {
    let (w, total) = match s {
        Schedule::Constant { warmup_steps } => (*warmup_steps, total),
        Schedule::Linear {
            warmup_ratio,
            warmup_steps,
        }
        | Schedule::WarmupCosine {
            warmup_ratio,
            warmup_steps,
            ..
        } => (warmup(*warmup_ratio, *warmup_steps, total), total),
    };
    if step < w {
        return (step + 1) as f64 / w as f64;
    }
    let progress = (step - w) as f64 / (total.saturating_sub(w)).max(1) as f64;
    match s {
        Schedule::Constant { .. } => 1.0,
        Schedule::Linear { .. } => (1.0 - progress).max(0.0),
        Schedule::WarmupCosine { min_lr_ratio, .. } => {
            min_lr_ratio
                + (1.0 - min_lr_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::WarmupCosine {
            warmup_ratio: 0.1,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
        };
        // 100 steps, 10 warmup: step 0 -> 1/10, step 9 -> 1, midpoint of decay -> 0.5, last -> near 0.
        assert!((factor(&s, 0, 100) - 0.1).abs() < 1e-12);
        assert!((factor(&s, 9, 100) - 1.0).abs() < 1e-12);
        assert!((factor(&s, 10, 100) - 1.0).abs() < 1e-12);
        assert!((factor(&s, 55, 100) - 0.5).abs() < 1e-12);
        assert!(factor(&s, 99, 100) < 0.001);
        let l = Schedule::Linear {
            warmup_ratio: 0.0,
            warmup_steps: 0,
        };
        assert!((factor(&l, 50, 100) - 0.5).abs() < 1e-12);
    }
}
