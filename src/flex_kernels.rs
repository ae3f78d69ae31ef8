//! Checks of the patched burn-flex kernels (vendor/burn-flex, PATCHES.md) against plain Rust references: the
//! threaded element-wise paths (above 32K elements) must give exactly the single-threaded results, whatever the
//! layout (contiguous, in place, broadcast, permuted); `exp` (libm's, threaded) and the sigmoid (on the patch's
//! vectorising exp) must stay within a few ulp of the correctly rounded value over the whole f32 range; thin matrix
//! products split over threads must give the one-thread bits.
use burn::tensor::{Bool, Device, Tensor, TensorData, activation};

fn vec_of<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Deterministic values in about [-4, 4), distinct enough to catch misplaced elements.
fn values(n: usize, salt: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(salt.wrapping_mul(40_503));
            (h >> 8) as f32 / (1u32 << 24) as f32 * 8.0 - 4.0
        })
        .collect()
}

fn ulps(a: f32, b: f32) -> u32 {
    if a == b {
        return 0;
    }
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn exp_and_sigmoid_are_within_a_few_ulp_over_the_f32_range() {
    let device = Device::flex();
    let mut xs: Vec<f32> = (0..200_001).map(|i| -110.0 + i as f32 * 0.001).collect();
    xs.extend([
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        88.72,
        88.73,
        -87.3,
        -103.0,
        -103.9,
        -104.0,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ]);
    let n = xs.len();
    let got = vec_of(tensor(xs.clone(), [n], &device).exp());
    let mut worst = 0;
    for (&x, &y) in xs.iter().zip(&got) {
        let want = (x as f64).exp() as f32;
        if x.is_nan() {
            assert!(y.is_nan(), "exp(NaN) = {y}");
        } else if want.is_infinite() || want == 0.0 {
            assert_eq!(y, want, "exp({x})");
        } else if want < f32::MIN_POSITIVE {
            // Subnormal results keep an absolute error of a unit or two of the last place.
            assert!(ulps(y, want) <= 2, "exp({x}) = {y:e}, want {want:e}");
        } else {
            worst = worst.max(ulps(y, want));
        }
    }
    assert!(worst <= 3, "exp: {worst} ulp");

    let s = vec_of(activation::sigmoid(tensor(xs.clone(), [n], &device)));
    for (&x, &y) in xs.iter().zip(&s) {
        let want = (1.0 / (1.0 + (-(x as f64)).exp())) as f32;
        if x.is_nan() {
            assert!(y.is_nan());
        } else {
            assert!(
                (y - want).abs() <= 4.0 * f32::EPSILON * want.max(f32::MIN_POSITIVE),
                "sigmoid({x}) = {y:e}, want {want:e}"
            );
        }
    }
}

/// Every patched path on a tensor large enough to be split over threads, against the same arithmetic done
/// element by element here: bit-for-bit.
#[test]
fn threaded_elementwise_paths_equal_the_serial_arithmetic() {
    let device = Device::flex();
    let (a, b, c) = (3, 170, 130); // 66,300 elements: above the 32K threshold
    let n = a * b * c;
    let x = values(n, 1);
    let y = values(n, 2);
    let row = values(c, 3);
    let col: Vec<f32> = values(a * b, 4);
    let same = |got: Vec<f32>, want: Vec<f32>, what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits(),
                "{what}: element {i}: {g} vs {w}"
            );
        }
    };
    let tx = || tensor(x.clone(), [a, b, c], &device);
    let ty = || tensor(y.clone(), [a, b, c], &device);
    let zip = |f: fn(f32, f32) -> f32| x.iter().zip(&y).map(|(&p, &q)| f(p, q)).collect::<Vec<_>>();

    // Contiguous, destination reused (unique lhs) and allocated (lhs still held).
    same(vec_of(tx() + ty()), zip(|p, q| p + q), "add in place");
    let held = tx();
    same(
        vec_of(held.clone() - ty()),
        zip(|p, q| p - q),
        "sub, lhs held",
    );
    same(
        vec_of(held.clone() * ty().clone()),
        zip(|p, q| p * q),
        "mul, both held",
    );
    same(vec_of(tx() / ty()), zip(|p, q| p / q), "div");
    drop(held);

    // Scalar ops and unary maths, in place and on a view that keeps its buffer shared.
    let sx: Vec<f32> = x.iter().map(|&p| p * 0.5 + 1.25).collect();
    same(vec_of(tx() * 0.5 + 1.25), sx, "scalar");
    let held = tx();
    let sqrt: Vec<f32> = x.iter().map(|p| p.abs().sqrt()).collect();
    same(vec_of(held.clone().abs().sqrt()), sqrt, "sqrt");
    let log: Vec<f32> = x.iter().map(|p| (p.abs() + 1.0).ln()).collect();
    same(vec_of((held.clone().abs() + 1.0).log()), log, "log");

    // Broadcasts: a row over [a, b, c], a column [a, b, 1], both orders (zip nests, in place and allocating).
    let trow = || tensor(row.clone(), [1, 1, c], &device);
    let tcol = || tensor(col.clone(), [a, b, 1], &device);
    let with_row: Vec<f32> = (0..n).map(|i| x[i] - row[i % c]).collect();
    same(vec_of(tx() - trow()), with_row.clone(), "sub row, in place");
    same(
        vec_of(held.clone() - trow()),
        with_row,
        "sub row, allocated",
    );
    let by_col: Vec<f32> = (0..n).map(|i| col[i / c] / x[i]).collect();
    same(vec_of(tcol() / tx()), by_col.clone(), "column / tensor");
    same(
        vec_of(tcol() / held.clone()),
        by_col,
        "column / held tensor",
    );

    // A permuted operand: the nest walks it strided; and the permuted copy itself.
    let xt = held.clone().swap_dims(1, 2); // [a, c, b] view
    let yt = tensor(y.clone(), [a, c, b], &device);
    let perm = |i: usize| {
        let (p, r) = (i / (c * b), i % (c * b));
        let (k, j) = (r / b, r % b);
        x[p * b * c + j * c + k]
    };
    let want: Vec<f32> = (0..n).map(|i| perm(i) * y[i]).collect();
    same(vec_of(xt.clone() * yt), want, "permuted * contiguous");
    let copied: Vec<f32> = (0..n).map(perm).collect();
    same(vec_of(xt.clone().reshape([n])), copied, "permuted copy");
    // [a, b, c] -> [b, a, c]: inner runs of c kept, outer dims swapped (the attention head transpose).
    let heads = held.clone().swap_dims(0, 1).reshape([n]);
    let want: Vec<f32> = (0..n)
        .map(|i| {
            let (j, r) = (i / (a * c), i % (a * c));
            let (p, k) = (r / c, r % c);
            x[p * b * c + j * c + k]
        })
        .collect();
    same(vec_of(heads), want, "head transpose copy");

    // mask_fill: a full mask (in place), a broadcast causal-style mask.
    let m: Vec<bool> = (0..n).map(|i| (i * 7) % 5 == 0).collect();
    let tm = Tensor::<3, Bool>::from_data(TensorData::new(m.clone(), [a, b, c]), &device);
    let want: Vec<f32> = (0..n).map(|i| if m[i] { -1e9 } else { x[i] }).collect();
    same(
        vec_of(tx().mask_fill(tm.clone(), -1e9)),
        want.clone(),
        "mask_fill in place",
    );
    same(
        vec_of(held.clone().mask_fill(tm, -1e9)),
        want,
        "mask_fill allocated",
    );
    let mrow: Vec<bool> = (0..b * c).map(|i| i % c > i / c).collect();
    let tmr = Tensor::<3, Bool>::from_data(TensorData::new(mrow.clone(), [1, b, c]), &device);
    let want: Vec<f32> = (0..n)
        .map(|i| {
            if mrow[i % (b * c)] {
                f32::NEG_INFINITY
            } else {
                x[i]
            }
        })
        .collect();
    same(
        vec_of(tx().mask_fill(tmr, f32::NEG_INFINITY)),
        want,
        "broadcast mask_fill",
    );

    // Softmax through burn's decomposition (max, sub, exp, sum, div: all patched paths) on rows of c.
    let sm = vec_of(activation::softmax(held, 2));
    for r in 0..a * b {
        let xs = &x[r * c..(r + 1) * c];
        let mx = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = xs.iter().map(|&v| (v as f64 - mx).exp()).sum();
        for k in 0..c {
            let want = (xs[k] as f64 - mx).exp() / z;
            let got = sm[r * c + k] as f64;
            assert!(
                (got - want).abs() <= 4e-6 * want + 1e-9,
                "softmax row {r} col {k}"
            );
        }
    }
}

/// Vector–matrix and thin products split into column blocks over threads (the patch's `gemm_call_split`, the
/// decode step's projections) give the bits of the same product on one thread, and the product itself.
#[test]
fn split_thin_products_equal_the_single_thread_product() {
    let device = Device::flex();
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let (one, four) = (pool(1), pool(4));
    // (m, k, n, batched as [1, m, k] @ [1, k, n], weight stored [n, k] and transposed)
    let cases = [
        (1, 384, 1000, false, false), // 2-D gemv, a ragged last block
        (1, 384, 1000, false, true),  // against a transposed weight (gemm's row-major gemv)
        (1, 256, 1536, true, false),  // a decode step as burn's linear sends it: one batch of m = 1
        (3, 512, 700, false, false),  // thin, under gemm's own threading threshold
        (1, 768, 10_000, true, true), // an LM head: over the threshold, still a one-thread gemv in gemm
        (8, 1024, 900, false, false), // eight decode rows (gemm's packed kernels, k over one block)
        (8, 1024, 900, true, true),
        (2, 300, 1100, false, true), // blocks of uneven width, the last one the widest
    ];
    for (case, &(m, k, n, batched, transposed)) in cases.iter().enumerate() {
        let x = values(m * k, 10 + case as u32);
        let w = values(k * n, 20 + case as u32);
        let product = || {
            let w = if transposed {
                // the same [k, n] matrix as a view of its [n, k] transpose
                let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
                tensor(wt, [n, k], &device).transpose()
            } else {
                tensor(w.clone(), [k, n], &device)
            };
            let x = tensor(x.clone(), [m, k], &device);
            if batched {
                vec_of(x.unsqueeze_dim::<3>(0).matmul(w.unsqueeze_dim::<3>(0)))
            } else {
                vec_of(x.matmul(w))
            }
        };
        let serial = one.install(product);
        let split = four.install(product);
        assert_eq!(serial.len(), m * n);
        for (i, (s, p)) in serial.iter().zip(&split).enumerate() {
            assert!(
                s.to_bits() == p.to_bits(),
                "case {case}: element {i}: {s} vs {p}"
            );
            let (r, c) = (i / n, i % n);
            let terms = (0..k).map(|j| x[r * k + j] as f64 * w[j * n + c] as f64);
            let (want, size): (f64, f64) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
            // f32 summation error is bounded by k·ε·Σ|terms|; in practice far below
            assert!(
                (*p as f64 - want).abs() <= 1e-5 * size,
                "case {case}: element {i}"
            );
        }
    }
}
