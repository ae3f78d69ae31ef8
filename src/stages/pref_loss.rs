//! Preference losses over per-pair sequence log-probabilities, as the papers define them and TRL implements them.
//! Inputs per pair: the policy's summed log-prob of the chosen / rejected response tokens (`pc`, `pr`), the
//! reference's (`rc`, `rr`; zero for reference-free losses) and the response lengths in tokens (`nc`, `nr`).
//! With h = (pc − rc) − (pr − rr):
//! - `sigmoid` (DPO, Rafailov et al. 2023): −log σ(βh); with label smoothing ε (cDPO): −(1−ε) log σ(βh) − ε log σ(−βh)
//! - `robust` (Chowdhury et al. 2024): (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε)
//! - `ipo` (Azar et al. 2023): (h̄ − 1/(2β))², h̄ from length-averaged log-probs (as TRL)
//! - `hinge` (SLiC): max(0, 1 − βh)
//! - `simpo` (Meng et al. 2024, reference-free): −log σ(β(pc/nc − pr/nr) − γ)
//! - `orpo` (Hong et al. 2024, reference-free): NLL(chosen, per token) − λ log σ(log odds(c) − log odds(r)),
//!   log odds(y) = p̄ − log(1 − exp p̄), p̄ = mean token log-prob
//!
//! Implicit rewards for logging: β(pc − rc) and β(pr − rr) (SimPO / ORPO: β·p̄ / λ·p̄).
use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, relu};

pub use crate::recipe::schema::PrefLoss;

impl Default for PrefLoss {
    fn default() -> Self {
        PrefLoss::Sigmoid {
            beta: 0.1,
            label_smoothing: 0.0,
        }
    }
}

impl PrefLoss {
    /// Whether the loss compares against a reference model.
    pub fn needs_reference(&self) -> bool {
        !matches!(self, PrefLoss::Simpo { .. } | PrefLoss::Orpo { .. })
    }

    /// The recipe error for out-of-range settings, if any.
    pub fn check(&self) -> Option<String> {
        let (b, e) = match *self {
            PrefLoss::Sigmoid {
                beta,
                label_smoothing,
            } => (beta, label_smoothing),
            PrefLoss::Robust {
                beta,
                label_smoothing,
            } => (beta, label_smoothing),
            PrefLoss::Ipo { beta } | PrefLoss::Hinge { beta } | PrefLoss::Simpo { beta, .. } => {
                (beta, 0.0)
            }
            PrefLoss::Orpo { lambda } => (lambda, 0.0),
        };
        if !(b > 0.0) {
            return Some(format!("beta (or lambda) must be > 0, got {b}"));
        }
        if !(0.0..0.5).contains(&e) {
            return Some(format!("label_smoothing must be in [0, 0.5), got {e}"));
        }
        None
    }
}

/// Per-pair log-probs (all [n]); `rc`/`rr` are zeros for reference-free losses.
pub struct PairLogps {
    pub pc: Tensor<1>,
    pub pr: Tensor<1>,
    pub rc: Tensor<1>,
    pub rr: Tensor<1>,
    pub nc: Tensor<1>,
    pub nr: Tensor<1>,
}

/// (per-pair losses [n], chosen rewards [n], rejected rewards [n]).
pub fn losses(kind: &PrefLoss, x: &PairLogps) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let h = || (x.pc.clone() - x.rc.clone()) - (x.pr.clone() - x.rr.clone());
    let ref_rewards = |b: f64| {
        (
            (x.pc.clone() - x.rc.clone()).mul_scalar(b),
            (x.pr.clone() - x.rr.clone()).mul_scalar(b),
        )
    };
    let avg_c = || x.pc.clone() / x.nc.clone();
    let avg_r = || x.pr.clone() / x.nr.clone();
    match *kind {
        PrefLoss::Sigmoid {
            beta,
            label_smoothing: e,
        } => {
            let z = h().mul_scalar(beta);
            let l = log_sigmoid(z.clone())
                .mul_scalar(-(1.0 - e))
                .sub(log_sigmoid(z.neg()).mul_scalar(e));
            let (c, r) = ref_rewards(beta);
            (l, c, r)
        }
        PrefLoss::Robust {
            beta,
            label_smoothing: e,
        } => {
            let z = h().mul_scalar(beta);
            let l = log_sigmoid(z.clone())
                .mul_scalar(-(1.0 - e))
                .add(log_sigmoid(z.neg()).mul_scalar(e))
                .div_scalar(1.0 - 2.0 * e);
            let (c, r) = ref_rewards(beta);
            (l, c, r)
        }
        PrefLoss::Ipo { beta } => {
            let hbar =
                (avg_c() - x.rc.clone() / x.nc.clone()) - (avg_r() - x.rr.clone() / x.nr.clone());
            let l = hbar.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2);
            let (c, r) = ref_rewards(beta);
            (l, c, r)
        }
        PrefLoss::Hinge { beta } => {
            let l = relu(h().mul_scalar(-beta).add_scalar(1.0));
            let (c, r) = ref_rewards(beta);
            (l, c, r)
        }
        PrefLoss::Simpo { beta, gamma } => {
            let z = (avg_c() - avg_r()).mul_scalar(beta).sub_scalar(gamma);
            (
                log_sigmoid(z).neg(),
                avg_c().mul_scalar(beta),
                avg_r().mul_scalar(beta),
            )
        }
        PrefLoss::Orpo { lambda } => {
            // log(1 - exp(p̄)) = log1p(-exp(p̄)), p̄ < 0
            let log_odds = |p: Tensor<1>| p.clone() - p.exp().neg().log1p();
            let ratio = log_sigmoid(log_odds(avg_c()) - log_odds(avg_r()));
            let l = avg_c().neg() - ratio.mul_scalar(lambda);
            (l, avg_c().mul_scalar(lambda), avg_r().mul_scalar(lambda))
        }
    }
}

/// Bradley–Terry loss of a reward model: −log σ(r_chosen − r_rejected), per pair.
pub fn bradley_terry(r_chosen: Tensor<1>, r_rejected: Tensor<1>) -> Tensor<1> {
    log_sigmoid(r_chosen - r_rejected).neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::layers::{float_tensor, to_vec};
    use burn::tensor::Device;

    fn t(v: &[f64]) -> Tensor<1> {
        float_tensor(
            v.iter().map(|&x| x as f32).collect(),
            [v.len()],
            &Device::flex(),
        )
    }

    /// One pair: pc = -10, pr = -14, rc = -11, rr = -12, nc = 5, nr = 8.
    fn pair() -> PairLogps {
        PairLogps {
            pc: t(&[-10.0]),
            pr: t(&[-14.0]),
            rc: t(&[-11.0]),
            rr: t(&[-12.0]),
            nc: t(&[5.0]),
            nr: t(&[8.0]),
        }
    }

    fn ls(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    fn one(kind: PrefLoss) -> (f64, f64, f64) {
        let (l, c, r) = losses(&kind, &pair());
        (
            to_vec(l)[0] as f64,
            to_vec(c)[0] as f64,
            to_vec(r)[0] as f64,
        )
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    #[test]
    fn dpo_family_by_hand() {
        // h = (-10 - -11) - (-14 - -12) = 1 - (-2) = 3
        let (l, c, r) = one(PrefLoss::Sigmoid {
            beta: 0.1,
            label_smoothing: 0.0,
        });
        close(l, -ls(0.3)); // -log σ(0.3) = 0.554355
        close(l, 0.554355);
        close(c, 0.1); // β(pc - rc) = 0.1 · 1
        close(r, -0.2); // β(pr - rr) = 0.1 · -2
        // cDPO ε = 0.1: -(0.9) log σ(0.3) - 0.1 log σ(-0.3)
        let (l, _, _) = one(PrefLoss::Sigmoid {
            beta: 0.1,
            label_smoothing: 0.1,
        });
        close(l, -0.9 * ls(0.3) - 0.1 * ls(-0.3));
        // robust ε = 0.1: (-(0.9) log σ(0.3) + 0.1 log σ(-0.3)) / 0.8
        let (l, _, _) = one(PrefLoss::Robust {
            beta: 0.1,
            label_smoothing: 0.1,
        });
        close(l, (-0.9 * ls(0.3) + 0.1 * ls(-0.3)) / 0.8);
        // hinge: max(0, 1 - 0.1·3) = 0.7
        close(one(PrefLoss::Hinge { beta: 0.1 }).0, 0.7);
        // ipo on length-averaged log-probs: h̄ = (-10/5 + 11/5) - (-14/8 + 12/8) = 0.2 + 0.25 = 0.45;
        // (0.45 - 1/(2·0.1))² = (0.45 - 5)² = 20.7025
        close(one(PrefLoss::Ipo { beta: 0.1 }).0, 20.7025);
    }

    #[test]
    fn reference_free_losses_by_hand() {
        // SimPO β=2, γ=1: -log σ(2(-10/5 - -14/8) - 1) = -log σ(2(-2 + 1.75) - 1) = -log σ(-1.5)
        let (l, c, r) = one(PrefLoss::Simpo {
            beta: 2.0,
            gamma: 1.0,
        });
        close(l, -ls(-1.5));
        close(c, -4.0);
        close(r, -3.5);
        // ORPO λ=0.1: p̄c = -2, p̄r = -1.75; log odds = p̄ - ln(1 - e^p̄)
        let lo = |p: f64| p - (1.0 - p.exp()).ln();
        let want = 2.0 - 0.1 * ls(lo(-2.0) - lo(-1.75));
        close(one(PrefLoss::Orpo { lambda: 0.1 }).0, want);
    }

    #[test]
    fn policy_equal_to_reference_gives_ln2() {
        let x = PairLogps {
            pc: t(&[-3.0, -7.5]),
            pr: t(&[-4.0, -2.0]),
            rc: t(&[-3.0, -7.5]),
            rr: t(&[-4.0, -2.0]),
            nc: t(&[2.0, 3.0]),
            nr: t(&[2.0, 1.0]),
        };
        let (l, c, r) = losses(&PrefLoss::default(), &x);
        for v in to_vec(l) {
            close(v as f64, std::f64::consts::LN_2);
        }
        assert!(to_vec(c).iter().chain(&to_vec(r)).all(|&v| v == 0.0));
    }

    #[test]
    fn bradley_terry_by_hand() {
        // -log σ(1.5 - 0.5) = ln(1 + e^-1) = 0.313262
        let l = to_vec(bradley_terry(t(&[1.5, 0.0]), t(&[0.5, 0.0])));
        close(l[0] as f64, 0.313262);
        close(l[1] as f64, std::f64::consts::LN_2);
    }

    #[test]
    fn settings_are_checked() {
        assert!(
            PrefLoss::Sigmoid {
                beta: 0.0,
                label_smoothing: 0.0
            }
            .check()
            .is_some()
        );
        assert!(
            PrefLoss::Robust {
                beta: 0.1,
                label_smoothing: 0.5
            }
            .check()
            .is_some()
        );
        assert!(PrefLoss::default().check().is_none());
        assert!(!PrefLoss::Orpo { lambda: 0.1 }.needs_reference());
    }
}
