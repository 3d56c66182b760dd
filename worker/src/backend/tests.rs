//! Every CPU operation against the reference backend over seeded random inputs and odd shapes,
//! plus known values and the shape errors. Both backends use host tensors, so one harness drives
//! both through `dyn Backend<Tensor = CpuTensor>`. The CPU backend runs with 1 thread (serial
//! paths) and 3 threads (parallel paths: cases of 2^20 multiply-adds and more split, smaller
//! ones run on the calling thread at any thread count).

use proptest::prelude::*;

use super::test_util::{AttnCase, AttnInputs, EXACT, PagedCase, ProjectionInputs, Rng, Tol, assert_close};
use super::*;

type Host = dyn Backend<Tensor = CpuTensor, Paged = paged::HostPaged>;

fn cpu(threads: usize) -> CpuBackend {
    CpuBackend::new(threads).expect("thread pool")
}

/// Runs `op` on the reference backend and on the CPU backend (1 and 3 threads) over the same
/// inputs and checks that the shapes agree and the values are within `tol`.
fn compare(
    what: &str,
    tol: Tol,
    inputs: &[(&[f32], &[usize])],
    op: impl Fn(&Host, &[CpuTensor]) -> Result<CpuTensor>,
) {
    let eval = |b: &Host| {
        let ts: Vec<CpuTensor> = inputs
            .iter()
            .map(|(d, s)| b.from_host(d, s).expect("input"))
            .collect();
        let out = op(b, &ts).unwrap_or_else(|e| panic!("{what} on {}: {e}", b.name()));
        (b.shape(&out).to_vec(), b.to_host(&out).expect("to_host"))
    };
    let (want_shape, want) = eval(&ReferenceBackend);
    for threads in [1, 3] {
        let (shape, got) = eval(&cpu(threads));
        assert_eq!(shape, want_shape, "{what}: shape ({threads} threads)");
        assert_close(&format!("{what} ({threads} threads)"), &got, &want, tol);
    }
}

#[test]
fn linear_matches_reference() {
    // Products of k=384 in f32 against f64: relative error ~1e-6, plus cancellation near zero.
    let tol = Tol {
        atol: 1e-4,
        rtol: 1e-4,
    };
    let mut rng = Rng::new(1);
    for &(n, k, m) in &[(1, 1, 1), (3, 17, 5), (17, 384, 65), (65, 384, 1536), (5, 64, 3)] {
        let (x, w, b) = (rng.vec(n * k, 1.0), rng.vec(m * k, 1.0), rng.vec(m, 1.0));
        let inputs: &[(&[f32], &[usize])] = &[(&x, &[n, k]), (&w, &[m, k]), (&b, &[m])];
        compare(&format!("linear {n}x{k}x{m} +bias"), tol, inputs, |be, t| {
            be.linear(&t[0], &t[1], Some(&t[2]))
        });
        compare(&format!("linear {n}x{k}x{m}"), tol, inputs, |be, t| {
            be.linear(&t[0], &t[1], None)
        });
    }
    // Leading dimensions are flattened: x [2, 3, 17] -> [2, 3, 5].
    let (x, w) = (rng.vec(2 * 3 * 17, 1.0), rng.vec(5 * 17, 1.0));
    compare(
        "linear rank 3",
        tol,
        &[(&x, &[2, 3, 17]), (&w, &[5, 17])],
        |be, t| be.linear(&t[0], &t[1], None),
    );
}

#[test]
fn fused_ops_match_their_compositions() {
    // The reference backend runs the trait's default compositions (linear then activation,
    // split then silu_mul, add then rms_norm) in f64; the CPU backend its fused versions.
    let tol = Tol {
        atol: 1e-4,
        rtol: 1e-4,
    };
    let mut rng = Rng::new(3);
    for &(n, k, m) in &[(1, 1, 1), (17, 384, 65), (65, 96, 1536)] {
        let (x, w, b) = (rng.vec(n * k, 1.0), rng.vec(m * k, 0.3), rng.vec(m, 1.0));
        let inputs: &[(&[f32], &[usize])] = &[(&x, &[n, k]), (&w, &[m, k]), (&b, &[m])];
        for act in [
            Activation::Identity,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Silu,
        ] {
            compare(
                &format!("linear_act {act:?} {n}x{k}x{m}"),
                tol,
                inputs,
                |be, t| be.linear_act(&t[0], &t[1], Some(&t[2]), act),
            );
        }
        compare(
            &format!("linear_act {n}x{k}x{m} no bias"),
            tol,
            inputs,
            |be, t| be.linear_act(&t[0], &t[1], None, Activation::Gelu),
        );
    }
    let elementwise = Tol {
        atol: 2e-6,
        rtol: 1e-5,
    };
    for &(rows, n) in &[(1, 1), (3, 17), (33, 4096), (2, 11008)] {
        let x = rng.vec(rows * 2 * n, 4.0);
        compare(
            &format!("swiglu [{rows}, {}]", 2 * n),
            elementwise,
            &[(&x, &[rows, 2 * n])],
            |be, t| be.swiglu(&t[0]),
        );
    }
    // The projections that fold a norm before or a residual add after the product (the CPU
    // accumulates the residual into the product's buffer; the reference composes).
    for &(rows, k, m) in &[(1, 8, 3), (4, 384, 65), (65, 96, 1536)] {
        let projection = ProjectionInputs::new(&mut rng, rows, k, m);
        let inputs = &projection.inputs();
        compare(
            &format!("rms_norm_linear {rows}x{k}x{m}"),
            tol,
            inputs,
            |be, t| be.rms_norm_linear(&t[0], &t[1], 1e-6, &t[2], Some(&t[3])),
        );
        compare(
            &format!("rms_norm_swiglu {rows}x{k}x{m}"),
            tol,
            inputs,
            |be, t| be.rms_norm_swiglu(&t[0], &t[1], 1e-6, &t[5]),
        );
        compare(
            &format!("linear_add {rows}x{k}x{m} +bias"),
            tol,
            inputs,
            |be, t| be.linear_add(&t[0], &t[2], Some(&t[3]), t[4].clone()),
        );
        compare(&format!("linear_add {rows}x{k}x{m}"), tol, inputs, |be, t| {
            be.linear_add(&t[0], &t[2], None, t[4].clone())
        });
    }
    let (x, w) = (cpu(1).zeros(&[2, 8]).unwrap(), cpu(1).zeros(&[3, 8]).unwrap());
    let wrong = cpu(1).zeros(&[2, 4]).unwrap();
    assert!(
        cpu(1).linear_add(&x, &w, None, wrong).is_err(),
        "a residual of another shape is an error"
    );
    // The default split + rope: q and k rotated, v as it was; shapes that do not split are
    // errors.
    let (t, heads, kv_heads, d) = (5, 6, 2, 8);
    let qkv = rng.vec(t * (heads + 2 * kv_heads) * d, 1.0);
    let positions = [0, 3, 7, 100, 4095];
    for b in [&cpu(1) as &Host, &ReferenceBackend] {
        let x = b.from_host(&qkv, &[t, (heads + 2 * kv_heads) * d]).unwrap();
        let (q, k, v) = b.split_qkv_rope(&x, (heads, kv_heads), &positions, 1e4).unwrap();
        let parts = b
            .split_last(&x, &[heads * d, kv_heads * d, kv_heads * d])
            .unwrap();
        let want_q = b
            .rope(
                &b.reshape(parts[0].clone(), &[t, heads, d]).unwrap(),
                &positions,
                1e4,
            )
            .unwrap();
        assert_eq!(q, want_q);
        assert_eq!(b.shape(&k), &[t, kv_heads, d]);
        assert_eq!(b.to_host(&v).unwrap(), b.to_host(&parts[2]).unwrap());
        assert!(
            b.split_qkv_rope(&x, (heads, kv_heads + 1), &positions, 1e4)
                .is_err()
        );
    }
    let odd = cpu(1).from_host(&[1.0; 6], &[2, 3]).unwrap();
    assert!(cpu(1).swiglu(&odd).is_err(), "an odd width has no halves");
    assert!(ReferenceBackend.swiglu(&odd).is_err());
}

#[test]
fn matmul_matches_reference() {
    let tol = Tol {
        atol: 1e-4,
        rtol: 1e-4,
    };
    let mut rng = Rng::new(2);
    for &(b, n, k, m) in &[
        (1, 1, 1, 1),
        (5, 3, 17, 65),
        (1, 65, 384, 17),
        (5, 128, 32, 128),
        (3, 17, 1, 9),
        // Many small products, large in total: one task per product on the parallel path.
        (64, 16, 32, 64),
    ] {
        let (x, y) = (rng.vec(b * n * k, 1.0), rng.vec(b * k * m, 1.0));
        compare(
            &format!("matmul {b}x{n}x{k}x{m}"),
            tol,
            &[(&x, &[b, n, k]), (&y, &[b, k, m])],
            |be, t| be.matmul(&t[0], &t[1]),
        );
    }
    let (x, y) = (rng.vec(17 * 9, 1.0), rng.vec(9 * 4, 1.0));
    compare("matmul rank 2", tol, &[(&x, &[17, 9]), (&y, &[9, 4])], |be, t| {
        be.matmul(&t[0], &t[1])
    });
}

#[test]
fn elementwise_ops_match_reference() {
    let mut rng = Rng::new(3);
    // The erf approximation is good to ~2e-7 absolute; the rest to a few f32 ulps.
    let tol = Tol {
        atol: 2e-6,
        rtol: 1e-5,
    };
    for &shape in &[&[1usize][..], &[3, 17], &[65, 1536], &[5, 7, 9]] {
        let n = shape.iter().product();
        let (a, b) = (rng.vec(n, 6.0), rng.vec(n, 6.0));
        let one: &[(&[f32], &[usize])] = &[(&a, shape)];
        let two: &[(&[f32], &[usize])] = &[(&a, shape), (&b, shape)];
        compare(&format!("add {shape:?}"), tol, two, |be, t| be.add(&t[0], &t[1]));
        compare(&format!("silu_mul {shape:?}"), tol, two, |be, t| {
            be.silu_mul(&t[0], &t[1])
        });
        compare(&format!("gelu {shape:?}"), tol, one, |be, t| be.gelu(&t[0]));
        compare(&format!("gelu_tanh {shape:?}"), tol, one, |be, t| {
            be.gelu_tanh(&t[0])
        });
    }
}

#[test]
fn norms_match_reference() {
    // Row statistics summed in f32 over up to 768 values: ~1e-6 relative.
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-5,
    };
    let mut rng = Rng::new(4);
    for &rows in &[1, 3, 17, 65] {
        for &d in &[8, 33, 384, 768] {
            let (x, r) = (rng.vec(rows * d, 3.0), rng.vec(rows * d, 3.0));
            let (g, b) = (rng.vec(d, 2.0), rng.vec(d, 1.0));
            let inputs: &[(&[f32], &[usize])] = &[(&x, &[rows, d]), (&r, &[rows, d]), (&g, &[d]), (&b, &[d])];
            let what = format!("[{rows}, {d}]");
            compare(&format!("layer_norm {what}"), tol, inputs, |be, t| {
                be.layer_norm(&t[0], &t[2], &t[3], 1e-12)
            });
            compare(&format!("add_layer_norm {what}"), tol, inputs, |be, t| {
                be.add_layer_norm(&t[0], &t[1], &t[2], &t[3], 1e-5)
            });
            compare(&format!("rms_norm {what}"), tol, inputs, |be, t| {
                be.rms_norm(&t[0], &t[2], 1e-6)
            });
            // With an output projection in front (k = d), its bias, then the residual.
            let w = rng.vec(d * d, 1.0 / (d as f32).sqrt());
            let inputs: &[(&[f32], &[usize])] = &[
                (&x, &[rows, d]),
                (&w, &[d, d]),
                (&b, &[d]),
                (&r, &[rows, d]),
                (&g, &[d]),
            ];
            let product_tol = Tol {
                atol: 1e-4,
                rtol: 1e-4,
            }; // a product over d terms first, as the linear tests
            compare(
                &format!("linear_add_layer_norm {what}"),
                product_tol,
                inputs,
                |be, t| be.linear_add_layer_norm(&t[0], &t[1], Some(&t[2]), &t[3], (&t[4], &t[2]), 1e-5),
            );
        }
    }
}

#[test]
fn softmax_matches_reference_and_masks() {
    let tol = Tol {
        atol: 1e-6,
        rtol: 1e-5,
    };
    let mut rng = Rng::new(5);
    for &(rows, d) in &[(1, 1), (3, 17), (65, 128), (17, 1000)] {
        let mut x = rng.vec(rows * d, 20.0);
        for _ in 0..rows * d / 4 {
            x[rng.below(rows * d)] = f32::NEG_INFINITY;
        }
        compare(
            &format!("softmax [{rows}, {d}]"),
            tol,
            &[(&x, &[rows, d])],
            |be, t| be.softmax_rows(&t[0]),
        );
    }
    // A fully masked row gives zeros; the other row still sums to one.
    let b = cpu(1);
    let x = b.from_host(
        &[
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            0.0,
            1000.0,
            -1000.0,
        ],
        &[2, 3],
    );
    let out = b.to_host(&b.softmax_rows(&x.unwrap()).unwrap()).unwrap();
    assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn embedding_copies_rows_and_rejects_bad_ids() {
    let mut rng = Rng::new(6);
    let table = rng.vec(50 * 33, 1.0);
    let ids: Vec<u32> = (0..1500).map(|_| rng.below(50) as u32).collect();
    compare("embedding", EXACT, &[(&table, &[50, 33])], |be, t| {
        be.embedding(&ids, &t[0])
    });
    for b in [&cpu(1) as &Host, &ReferenceBackend] {
        let t = b.from_host(&table, &[50, 33]).unwrap();
        let err = b.embedding(&[3, 50], &t).unwrap_err();
        assert!(
            matches!(
                err,
                BackendError::OutOfRange {
                    index: 50,
                    len: 50,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(b.shape(&b.embedding(&[], &t).unwrap()), &[0, 33]);
    }
}

#[test]
fn rope_matches_hand_computed_case() {
    // head_dim 4, theta 10000: frequencies 1 and 0.01; position 1 rotates (x0, x2) by 1 rad and
    // (x1, x3) by 0.01 rad.
    let want = [-1.984_110_6, 1.959_900_7, 2.462_378, 4.019_799_7];
    for b in [&cpu(1) as &Host, &ReferenceBackend] {
        let x = b.from_host(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 4]).unwrap();
        let out = b.to_host(&b.rope(&x, &[1], 10_000.0).unwrap()).unwrap();
        assert_close(
            &format!("rope on {}", b.name()),
            &out,
            &want,
            Tol {
                atol: 1e-6,
                rtol: 1e-6,
            },
        );
        // Position 0 is the identity.
        let out = b.to_host(&b.rope(&x, &[0], 10_000.0).unwrap()).unwrap();
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0]);
    }
}

#[test]
fn rope_matches_reference() {
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-5,
    };
    let mut rng = Rng::new(7);
    for &(t, h, d, theta) in &[
        (1, 1, 8, 10_000.0),
        (17, 12, 32, 10_000.0),
        (65, 9, 64, 1_000_000.0),
        (3, 2, 2, 500.0),
    ] {
        let x = rng.vec(t * h * d, 2.0);
        let positions: Vec<usize> = (0..t).map(|_| rng.below(8192)).collect();
        compare(
            &format!("rope [{t}, {h}, {d}]"),
            tol,
            &[(&x, &[t, h, d])],
            |be, ts| be.rope(&ts[0], &positions, theta),
        );
    }
}

#[test]
fn attention_matches_reference() {
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-4,
    };
    let mut rng = Rng::new(8);
    for c in AttnCase::COMMON {
        let AttnInputs { q, k, v, valid } = c.inputs(&mut rng);
        let mask = c.mask(&valid);
        let (qs, ks) = (c.q_shape(), c.kv_shape());
        let what = format!(
            "attention q {qs:?} k {ks:?} padding {} causal {:?}",
            c.padding, c.causal
        );
        compare(&what, tol, &[(&q, &qs), (&k, &ks), (&v, &ks)], |be, t| {
            be.attention(&t[0], &t[1], &t[2], &mask)
        });
        if c.padding {
            let b = cpu(3);
            let t = |d: &[f32], s: &[usize]| b.from_host(d, s).unwrap();
            let out = b
                .to_host(&b.attention(&t(&q, &qs), &t(&k, &ks), &t(&v, &ks), &mask).unwrap())
                .unwrap();
            let row0 = &out[..c.s_q * c.heads * c.d];
            assert!(
                row0.iter().all(|&x| x == 0.0),
                "{what}: a fully masked batch row must give zeros"
            );
            assert!(out.iter().all(|x| x.is_finite()), "{what}: NaN or inf");
        }
    }
}

/// Writes a case's new keys and values into its pools and attends, on one backend: the output
/// and both pools after the write.
fn paged_step(b: &Host, inputs: &test_util::PagedInputs, c: &PagedCase) -> Result<[Vec<f32>; 3]> {
    let paged = b.prepare_paged(&inputs.plan)?;
    let mut keys = b.from_host(&inputs.keys, &inputs.pool_shape)?;
    let mut values = b.from_host(&inputs.values, &inputs.pool_shape)?;
    b.write_paged(&mut keys, &b.from_host(&inputs.new_keys, &c.new_shape())?, &paged)?;
    b.write_paged(
        &mut values,
        &b.from_host(&inputs.new_values, &c.new_shape())?,
        &paged,
    )?;
    let q = b.from_host(&inputs.q, &c.q_shape())?;
    let out = b.paged_attention(&q, &keys, &values, &paged)?;
    assert_eq!(b.shape(&out), c.q_shape());
    Ok([b.to_host(&out)?, b.to_host(&keys)?, b.to_host(&values)?])
}

#[test]
fn paged_attention_matches_reference() {
    let tol = Tol {
        atol: 1e-5,
        rtol: 1e-4,
    };
    let mut rng = Rng::new(21);
    for c in PagedCase::COMMON {
        let inputs = c.inputs(&mut rng);
        let [want, want_keys, want_values] = paged_step(&ReferenceBackend, &inputs, &c).unwrap();
        // The write touches exactly the new tokens' rows.
        let w = c.kv_heads * c.d;
        let changed = (0..want_keys.len() / w)
            .filter(|&r| want_keys[r * w..(r + 1) * w] != inputs.keys[r * w..(r + 1) * w])
            .count();
        assert_eq!(changed, c.q_shape()[0], "{c:?}: rows written");
        for threads in [1, 3] {
            let [got, keys, values] = paged_step(&cpu(threads), &inputs, &c).unwrap();
            assert_close(
                &format!("paged attention {c:?} ({threads} threads)"),
                &got,
                &want,
                tol,
            );
            assert_eq!(
                (keys, values),
                (want_keys.clone(), want_values.clone()),
                "{c:?}: pools"
            );
        }
    }
}

#[test]
fn paged_plans_that_do_not_fit_are_errors() {
    let c = PagedCase::COMMON[4]; // GQA: queries and keys differ in shape
    let inputs = c.inputs(&mut Rng::new(22));
    for b in [&cpu(1) as &Host, &ReferenceBackend] {
        let paged = b.prepare_paged(&inputs.plan).unwrap();
        // A pool one block short of the largest block id the tables name.
        let short = [(inputs.plan.blocks_needed() - 1) * c.block_size, c.kv_heads, c.d];
        let mut pool = b.zeros(&short).unwrap();
        let new = b.zeros(&c.new_shape()).unwrap();
        assert!(matches!(
            b.write_paged(&mut pool, &new, &paged),
            Err(BackendError::OutOfRange { .. })
        ));
        let q = b.zeros(&c.q_shape()).unwrap();
        assert!(matches!(
            b.paged_attention(&q, &pool, &pool, &paged),
            Err(BackendError::OutOfRange { .. })
        ));
        let mut pool = b.zeros(&inputs.pool_shape).unwrap();
        assert!(
            b.write_paged(&mut pool, &q, &paged).is_err(),
            "queries are not keys"
        );
        let [t, h, d] = c.q_shape();
        let fewer = b.zeros(&[t - 1, h, d]).unwrap();
        assert!(
            b.paged_attention(&fewer, &pool, &pool, &paged).is_err(),
            "token count"
        );
        let mut bad = inputs.plan.clone();
        bad.seqs[0].blocks.clear();
        assert!(b.prepare_paged(&bad).is_err(), "table too short");
    }
}

#[test]
fn zeros_that_cannot_be_allocated_are_an_error_not_an_abort() {
    // 2^45 floats are 2^47 bytes, the whole user address space of x86-64 Linux.
    let err = cpu(1).zeros(&[1 << 45]).map(|_| ()).unwrap_err();
    assert!(matches!(err, BackendError::OutOfMemory(_)), "{err}");
    assert!(err.to_string().contains("out of device memory"), "{err}");
    assert!(cpu(1).zeros(&[usize::MAX, 2]).is_err(), "overflowing shape");
    let z = cpu(1).zeros(&[3, 0]).unwrap();
    assert!(z.data().is_empty());
    assert_eq!(cpu(1).zeros(&[2, 3]).unwrap().data(), &[0.0; 6]);
}

#[test]
fn split_and_reshape() {
    let mut rng = Rng::new(9);
    let x = rng.vec(3 * 4 * 12, 1.0);
    for b in [&cpu(1) as &Host, &ReferenceBackend] {
        let t = b.from_host(&x, &[3, 4, 12]).unwrap();
        let parts = b.split_last(&t, &[4, 4, 4]).unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(b.shape(&parts[1]), &[3, 4, 4]);
        let mid = b.to_host(&parts[1]).unwrap();
        let want: Vec<f32> = x.chunks(12).flat_map(|row| row[4..8].to_vec()).collect();
        assert_eq!(mid, want);
        let r = b.reshape(t, &[12, 12]).unwrap();
        assert_eq!(b.shape(&r), &[12, 12]);
        assert!(b.reshape(r, &[5, 5]).is_err());
        assert!(b.split_last(&parts[0], &[1, 2]).is_err());
    }
}

#[test]
fn gelu_known_values() {
    let tol = Tol {
        atol: 3e-7,
        rtol: 1e-6,
    };
    for b in [&cpu(1) as &Host, &ReferenceBackend] {
        let x = b.from_host(&[1.0, -1.0, 3.0, -3.0, 0.0], &[5]).unwrap();
        let erf = b.to_host(&b.gelu(&x).unwrap()).unwrap();
        let erf_want = [0.841_344_8, -0.158_655_25, 2.995_950_3, -0.004_049_694, 0.0];
        assert_close(&format!("gelu on {}", b.name()), &erf, &erf_want, tol);
        let tanh = b.to_host(&b.gelu_tanh(&x).unwrap()).unwrap();
        assert_close(
            &format!("gelu_tanh on {}", b.name()),
            &tanh[..3],
            &[0.841_192, -0.158_808, 2.996_362_6],
            tol,
        );
    }
}

#[test]
fn shape_mismatches_are_errors() {
    for b in [&cpu(1) as &Host, &ReferenceBackend] {
        let t = |shape: &[usize]| b.from_host(&vec![0.5; shape.iter().product()], shape).unwrap();
        assert!(b.from_host(&[1.0, 2.0, 3.0], &[2, 2]).is_err());
        assert!(b.linear(&t(&[3, 4]), &t(&[5, 3]), None).is_err());
        assert!(b.linear(&t(&[3, 4]), &t(&[5, 4]), Some(&t(&[4]))).is_err());
        assert!(b.matmul(&t(&[2, 3, 4]), &t(&[3, 4, 5])).is_err());
        assert!(b.add(&t(&[2, 3]), &t(&[3, 2])).is_err());
        assert!(b.layer_norm(&t(&[2, 3]), &t(&[2]), &t(&[3]), 1e-5).is_err());
        assert!(b.rms_norm(&t(&[2, 0]), &t(&[0]), 1e-5).is_err());
        assert!(b.softmax_rows(&t(&[0])).is_err());
        assert!(b.rope(&t(&[2, 1, 3]), &[0, 1], 1e4).is_err());
        assert!(b.rope(&t(&[2, 1, 4]), &[0], 1e4).is_err());
        let (q, kv) = (t(&[1, 2, 4, 8]), t(&[1, 3, 3, 8]));
        assert!(
            b.attention(&q, &kv, &kv, &AttentionMask::none()).is_err(),
            "4 heads over 3 kv heads"
        );
        let kv = t(&[1, 3, 2, 8]);
        assert!(b.attention(&q, &kv, &kv, &AttentionMask::none()).is_ok());
        assert!(
            b.attention(&q, &kv, &kv, &AttentionMask::causal(2)).is_err(),
            "offset 2 + 2 > 3 keys"
        );
        assert!(
            b.attention(&q, &kv, &kv, &AttentionMask::padding(&[true; 2]))
                .is_err()
        );
        assert!(
            b.attention(&q, &kv, &t(&[1, 3, 2, 4]), &AttentionMask::none())
                .is_err()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn linear_any_shape(n in 1usize..40, k in 1usize..70, m in 1usize..40, bias: bool, seed: u64) {
        let mut rng = Rng::new(seed);
        let (x, w, b) = (rng.vec(n * k, 1.0), rng.vec(m * k, 1.0), rng.vec(m, 1.0));
        compare("linear", Tol { atol: 1e-5, rtol: 1e-4 }, &[(&x, &[n, k]), (&w, &[m, k]), (&b, &[m])], |be, t| {
            be.linear(&t[0], &t[1], bias.then_some(&t[2]))
        });
    }

    #[test]
    fn attention_any_shape(
        batch in 1usize..4, s_q in 1usize..20, extra in 0usize..20, kv_heads in 1usize..4, group in 1usize..4,
        d in prop::sample::select(vec![2usize, 8, 32, 64]), causal: bool, seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let (s_k, heads) = (s_q + extra, kv_heads * group);
        let q = rng.vec(batch * s_q * heads * d, 2.0);
        let k = rng.vec(batch * s_k * kv_heads * d, 2.0);
        let v = rng.vec(batch * s_k * kv_heads * d, 1.0);
        let valid: Vec<bool> = (0..batch * s_k).map(|_| rng.next() > -0.5).collect();
        let mask = AttentionMask { key_valid: Some(&valid), causal_offset: causal.then_some(extra) };
        let qs = [batch, s_q, heads, d];
        let ks = [batch, s_k, kv_heads, d];
        compare("attention", Tol { atol: 1e-5, rtol: 1e-4 }, &[(&q, &qs), (&k, &ks), (&v, &ks)], |be, t| {
            be.attention(&t[0], &t[1], &t[2], &mask)
        });
    }
}
