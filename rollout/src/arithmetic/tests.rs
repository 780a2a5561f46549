use super::*;

fn expr(s: &str) -> Expr {
    Expr::parse(s).unwrap()
}

#[test]
fn multiplication_first_then_left_to_right() {
    let e = expr("7+3*4-2");
    assert_eq!(e.value(), 17);
    assert_eq!(e.prompt(), "Q:7+3*4-2\n");
    assert_eq!(e.completion(&TrueFacts), "3*4=12\n7+12=19\n19-2=17\nA:17\n");
    // two multiplications, left one first; subtraction going negative
    let e = expr("2*3-9*4+1");
    assert_eq!(e.completion(&TrueFacts), "2*3=6\n9*4=36\n6-36=-30\n-30+1=-29\nA:-29\n");
    assert_eq!(e.value(), 2 * 3 - 9 * 4 + 1);
    assert_eq!(expr("8-3-4").value(), 1, "left associative");
}

#[test]
fn parse_round_trips_display() {
    for s in ["1+2", "9*9*9-1", "5-6+7*8"] {
        assert_eq!(expr(s).to_string(), s);
    }
    assert!(Expr::parse("1+").is_none());
    assert!(Expr::parse("1/2").is_none());
}

#[test]
fn flawed_teacher_is_consistent_and_near_its_rate() {
    let t = FlawedTeacher { rate: 0.15, seed: 7 };
    let mut wrong = 0;
    let mut total = 0;
    for a in 0..100 {
        for b in 0..100 {
            for op in [Op::Add, Op::Sub, Op::Mul] {
                let got = t.answer(a, op, b);
                assert_eq!(got, t.answer(a, op, b), "the same way every time");
                if got != op.apply(a, b) {
                    wrong += 1;
                    let off = (got - op.apply(a, b)).abs();
                    assert!((1..=3).contains(&off));
                }
                total += 1;
            }
        }
    }
    let share = wrong as f64 / total as f64;
    assert!((0.14..0.16).contains(&share), "share {share}");
    // another seed flaws other facts
    let u = FlawedTeacher { rate: 0.15, seed: 8 };
    let differ = (0..100).filter(|&a| t.is_flawed(a, Op::Add, 3) != u.is_flawed(a, Op::Add, 3)).count();
    assert!(differ > 5);
}

#[test]
fn flawed_steps_carry_their_error_forward() {
    // Find an expression whose first step the teacher gets wrong.
    let t = FlawedTeacher { rate: 0.5, seed: 1 };
    let g = Generator::new(Config { held_out: 0, ..Config::default() });
    let e = (0..1000).map(|i| g.train(3, i)).find(|e| {
        let s = e.solve(&t);
        s[0].c != s[0].op.apply(s[0].a, s[0].b)
    });
    let e = e.expect("some expression has a flawed first step");
    let steps = e.solve(&t);
    // The wrong first result is used as an operand later.
    let wrong = steps[0].c;
    assert!(steps[1..].iter().any(|s| s.a == wrong || s.b == wrong), "{steps:?}");
}

#[test]
fn generator_respects_ranges_and_keeps_held_out_disjoint() {
    let g = Generator::new(Config::default());
    assert_eq!(g.held_out().len(), 200);
    let held: HashSet<_> = g.held_out().iter().cloned().collect();
    assert_eq!(held.len(), 200, "held-out problems are distinct");
    for i in 0..2000 {
        let e = g.train(0, i);
        assert!(!held.contains(&e));
        assert!((2..=3).contains(&e.ops.len()));
        assert!(e.numbers.iter().all(|n| (1..=9).contains(n)));
    }
    // deterministic by (seed, index); different seeds differ
    assert_eq!(g.train(5, 17), g.train(5, 17));
    assert!((0..50).any(|i| g.train(5, i) != g.train(6, i)));
    // the held-out set does not depend on anything but its seed
    assert_eq!(Generator::new(Config::default()).held_out(), g.held_out());
}

#[test]
fn validate_names_bad_values() {
    let c = Config { ops: "+/".into(), ..Config::default() };
    assert!(c.validate().unwrap_err().to_string().contains("task.arithmetic.ops"));
    let c = Config { operators: [3, 2], ..Config::default() };
    assert!(c.validate().is_err());
    let c = Config { flaw_rate: 1.5, ..Config::default() };
    assert!(c.validate().is_err());
}
