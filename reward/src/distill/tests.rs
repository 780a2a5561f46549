use super::*;

/// The synthetic judge: a step `a op b = c` of single-digit arithmetic is
/// right iff `c` is the true value. Wrong steps are off by 1 to 3, so the model
/// has to learn the arithmetic facts rather than spot implausible numbers.
fn synthetic_step(rng: &mut SplitMix) -> (String, String, f32) {
    let a = (rng.next() % 10) as i64;
    let b = (rng.next() % 10) as i64;
    let (op, value) = match rng.next() % 3 {
        0 => ('+', a + b),
        1 => ('-', a - b),
        _ => ('*', a * b),
    };
    let right = rng.next().is_multiple_of(2);
    let c = if right {
        value
    } else {
        let off = 1 + (rng.next() % 3) as i64;
        if rng.next().is_multiple_of(2) { value + off } else { value - off }
    };
    let context = format!("Q: compute {a}{op}{b} and more\n");
    (context, format!("{a}{op}{b}={c}"), if right { 1.0 } else { 0.0 })
}

fn small() -> Config {
    Config { enabled: true, min_labels: 64, ..Config::default() }
}

#[test]
fn learns_a_synthetic_rule_to_90_percent_agreement() {
    // Tiny batches run far faster on one intra-op thread than on a pool that
    // competes with the other tests for two cores (measured: 4 s vs 26+ s).
    tch::set_num_threads(1);
    let d = Distiller::new(&small()).unwrap();
    let mut rng = SplitMix(7);
    assert_eq!(d.score(&[("", "1+1=2")]).unwrap(), vec![None], "no scores before min_labels");
    for _ in 0..8_000 {
        let (context, step, label) = synthetic_step(&mut rng);
        d.observe(&context, &step, label).unwrap();
    }
    let m = d.metrics();
    println!("distill metrics after 8000 labels: {m:?}");
    assert_eq!((m.labels, m.held_out), (8_000, 800));
    assert!(m.ready);
    let agreement = m.agreement.unwrap();
    assert!(agreement >= 0.9, "held-out agreement {agreement}");
    // And on steps it has never been shown.
    let mut fresh = SplitMix(12345);
    let tests: Vec<(String, String, f32)> = (0..2000).map(|_| synthetic_step(&mut fresh)).collect();
    let items: Vec<(&str, &str)> = tests.iter().map(|(c, s, _)| (c.as_str(), s.as_str())).collect();
    let scores = d.score(&items).unwrap();
    let agree = scores.iter().zip(&tests).filter(|(p, t)| (p.unwrap() >= 0.5) == (t.2 >= 0.5)).count();
    assert!(agree as f64 / 2000.0 >= 0.9, "fresh agreement {}", agree as f64 / 2000.0);
}

#[test]
fn features_are_deterministic_and_namespaced() {
    let d = Distiller::new(&small()).unwrap();
    assert_eq!(d.features("ctx", "1+1=2"), d.features("ctx", "1+1=2"));
    // n-grams 1..=5 of a 5-byte step: 5+4+3+2+1 = 15; of a 3-byte context: 3+2+1 = 6.
    assert_eq!(d.features("ctx", "1+1=2").len(), 21);
    // The same bytes as context and as step hash differently.
    assert_ne!(d.features("", "ab"), d.features("ab", ""));
}

#[test]
fn budget_admits_a_fraction_and_a_rate() {
    let t0 = Instant::now();
    let mut all = Budget::new(&Config::default());
    assert!((0..100).all(|i| all.admit(i, 5, t0)));
    let mut half = Budget::new(&Config { judge_fraction: 0.5, ..Config::default() });
    let admitted = (0..10_000).filter(|&i| half.admit(i, 1, t0)).count();
    assert!((4_500..5_500).contains(&admitted), "{admitted}");
    assert_eq!(half.refused, 10_000 - admitted as u64);
    // Two calls a second: a full bucket of 2, then one call per half second.
    let mut rate = Budget::new(&Config { judge_calls_per_sec: 2.0, ..Config::default() });
    assert!(rate.admit(0, 1, t0) && rate.admit(1, 1, t0));
    assert!(!rate.admit(2, 1, t0));
    assert!(rate.admit(3, 1, t0 + std::time::Duration::from_millis(500)));
    assert!(!rate.admit(4, 1, t0 + std::time::Duration::from_millis(600)));
}

#[test]
fn scores_wait_for_agreement_with_the_judge_not_a_label_count() {
    tch::set_num_threads(1);
    // A judge whose verdicts are coin flips unrelated to the step: nothing to
    // learn, so the held-out agreement stays near one half and distilled
    // scores are never used, however many labels arrive.
    let d = Distiller::new(&small()).unwrap();
    let (mut rng, mut coins) = (SplitMix(11), SplitMix(0x5eed));
    for _ in 0..2000 {
        let (context, step, _) = synthetic_step(&mut rng);
        let coin = if coins.next() >> 63 == 0 { 1.0 } else { 0.0 };
        d.observe(&context, &step, coin).unwrap();
    }
    let m = d.metrics();
    assert!(m.labels == 2000 && m.held_out >= 32, "{m:?}");
    assert!(m.agreement.unwrap() < m.min_agreement, "{m:?}");
    assert!(!m.ready && !d.ready(), "{m:?}");
    assert_eq!(d.score(&[("", "1+1=2")]).unwrap(), vec![None]);
    // The same number of labels from a consistent judge opens the gate.
    let d = Distiller::new(&small()).unwrap();
    for _ in 0..2000 {
        let (context, step, p) = synthetic_step(&mut rng);
        d.observe(&context, &step, p).unwrap();
    }
    assert!(d.ready(), "{:?}", d.metrics());
    assert!(d.score(&[("", "1+1=2")]).unwrap()[0].is_some());
}

#[test]
fn a_non_finite_judge_target_is_refused_and_counted() {
    let d = Distiller::new(&small()).unwrap();
    for bad in [f32::NAN, f32::INFINITY, -0.5, 1.5] {
        assert!(d.observe("ctx", "1+1=2", bad).is_err(), "{bad}");
    }
    d.observe("ctx", "1+1=2", 1.0).unwrap();
    let m = d.metrics();
    assert_eq!((m.rejected, m.labels), (4, 1), "{m:?}");
}

/// A judge wrong on 30% of steps (flips drawn at random), and a step
/// verifier that knows the truth: with `consensus`, the distilled model
/// learns only from the steps where the two agree, and agrees with the truth
/// on fresh steps more often than the model that learned from every verdict.
#[test]
fn consensus_filtering_learns_the_truth_better_from_a_judge_wrong_on_30_percent() {
    tch::set_num_threads(1);
    let labels = 3_000;
    let train = |consensus: bool| {
        // The agreement gate off, to compare the two models' own predictions (with
        // it on, the unfiltered model never opens: it cannot agree with a judge
        // wrong on 30% of steps on 75% of them).
        let d = Distiller::new(&Config { consensus, min_agreement: 0.0, ..small() }).unwrap();
        let (mut rng, mut flips) = (SplitMix(21), SplitMix(0xf1195));
        let mut wrong = 0;
        for _ in 0..labels {
            let (context, step, truth) = synthetic_step(&mut rng);
            let judge = if flips.next() % 10 < 3 {
                wrong += 1;
                1.0 - truth
            } else {
                truth
            };
            d.observe_checked(&context, &step, judge, Some(truth >= 0.5)).unwrap();
        }
        let mut fresh = SplitMix(777);
        let tests: Vec<(String, String, f32)> = (0..2000).map(|_| synthetic_step(&mut fresh)).collect();
        let items: Vec<(&str, &str)> = tests.iter().map(|(c, s, _)| (c.as_str(), s.as_str())).collect();
        let scores = d.score(&items).unwrap();
        let agree = scores.iter().zip(&tests).filter(|(p, t)| (p.expect("scored") >= 0.5) == (t.2 >= 0.5)).count();
        (agree as f64 / 2000.0, wrong, d.metrics())
    };
    let (plain, wrong, m_plain) = train(false);
    let (filtered, wrong_again, m) = train(true);
    println!("truth agreement: unfiltered {plain:.3}, consensus {filtered:.3}; {m:?}");
    assert_eq!(wrong, wrong_again);
    assert!((0.27..0.33).contains(&(wrong as f64 / labels as f64)), "{wrong}");
    // The filter dropped exactly the judge's wrong verdicts.
    assert_eq!((m.consensus_kept, m.consensus_dropped), ((labels - wrong) as u64, wrong as u64));
    let rate = m.consensus_keep_rate.unwrap();
    assert!((rate - (labels - wrong) as f64 / labels as f64).abs() < 1e-9, "{rate}");
    assert_eq!((m_plain.consensus_kept, m_plain.consensus_keep_rate), (0, None), "off: not counted");
    assert!(filtered > plain + 0.03, "consensus {filtered} vs unfiltered {plain}");
    // A step with no independent verdict is learned from either way.
    let d = Distiller::new(&Config { consensus: true, ..small() }).unwrap();
    assert!(d.observe_checked("c", "1+1=3", 1.0, None).unwrap());
    assert!(!d.observe_checked("c", "1+1=3", 1.0, Some(false)).unwrap());
    assert_eq!(d.metrics().labels, 1);
}

/// A checkpoint keeps the distilled model: a fresh distiller loaded from
/// what a ready one saved scores every step exactly as it does, is ready at
/// once with the same agreement and counters, and both go on learning alike
/// once the training buffer refills.
#[test]
fn a_saved_distiller_continues_where_it_stopped() {
    tch::set_num_threads(1);
    let cfg = Config { min_agreement: 0.0, ..small() };
    let d = Distiller::new(&cfg).unwrap();
    let mut rng = SplitMix(3);
    for _ in 0..600 {
        let (context, step, label) = synthetic_step(&mut rng);
        d.observe(&context, &step, label).unwrap();
    }
    assert!(d.ready());
    let dir = tempfile::tempdir().unwrap();
    d.save(dir.path()).unwrap();
    let fresh = Distiller::new(&Config { seed: 99, ..cfg.clone() }).unwrap();
    assert!(!fresh.ready());
    assert!(fresh.load(dir.path()).unwrap());
    let items: Vec<(String, String, f32)> = (0..200).map(|_| synthetic_step(&mut rng)).collect();
    let items: Vec<(&str, &str)> = items.iter().map(|(c, s, _)| (c.as_str(), s.as_str())).collect();
    assert_eq!(fresh.score(&items).unwrap(), d.score(&items).unwrap());
    let (a, b) = (d.metrics(), fresh.metrics());
    assert_eq!((a.labels, a.held_out, a.updates, a.ready, a.agreement), (b.labels, b.held_out, b.updates, b.ready, b.agreement));
    // A folder without a saved model (a run without distillation) is no error.
    assert!(!Distiller::new(&cfg).unwrap().load(tempfile::tempdir().unwrap().path()).unwrap());
}

/// A saved model of another shape, or a damaged file, is refused with the
/// file's name and the reason; nothing is half-loaded.
#[test]
fn a_saved_distiller_of_another_shape_or_damaged_is_refused_by_file() {
    let d = Distiller::new(&small()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    d.save(dir.path()).unwrap();
    let other = Distiller::new(&Config { dim: small().dim * 2, ..small() }).unwrap();
    let e = other.load(dir.path()).unwrap_err().to_string();
    assert!(e.contains(SAVED_STATE) && e.contains("distill.buckets, dim, hidden"), "{e}");
    std::fs::write(dir.path().join(SAVED_TENSORS), b"not safetensors").unwrap();
    let e = Distiller::new(&small()).unwrap().load(dir.path()).unwrap_err().to_string();
    assert!(e.contains(SAVED_TENSORS), "{e}");
    std::fs::write(dir.path().join(SAVED_STATE), b"{").unwrap();
    let e = Distiller::new(&small()).unwrap().load(dir.path()).unwrap_err().to_string();
    assert!(e.contains(SAVED_STATE), "{e}");
}
