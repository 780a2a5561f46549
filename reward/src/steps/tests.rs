use super::*;

fn verdicts(expr: &str, completion: &str) -> Vec<Option<f32>> {
    let steps: Vec<&str> = completion.lines().filter(|l| !l.trim().is_empty()).collect();
    check_arithmetic(expr, &steps)
}

#[test]
fn arithmetic_ideal_completion_is_all_right() {
    // 7+3*4-2: 3*4=12, 7+12=19, 19-2=17 (CONVENTIONS.md's example).
    assert_eq!(verdicts("7+3*4-2", "3*4=12\n7+12=19\n19-2=17\nA:17\n"), vec![Some(1.0); 4]);
}

#[test]
fn arithmetic_wrong_result_then_copied_forward() {
    // 3*4=13 is wrong; 7+13=20 uses 13, an earlier result, correctly; so does 20-2=18.
    // The answer 18 is not the true value 17.
    assert_eq!(
        verdicts("7+3*4-2", "3*4=13\n7+13=20\n20-2=18\nA:18\n"),
        vec![Some(0.0), Some(1.0), Some(1.0), Some(0.0)]
    );
}

#[test]
fn arithmetic_invented_or_reused_operands_are_wrong() {
    // 5 is not in the expression; 12 was already consumed by the second step.
    assert_eq!(verdicts("7+3*4-2", "3*4=12\n5+12=17\n"), vec![Some(1.0), Some(0.0)]);
    assert_eq!(verdicts("7+3*4", "3*4=12\n7+12=19\n12+7=19\n"), vec![Some(1.0), Some(1.0), Some(0.0)]);
    // Two equal numbers need two copies.
    assert_eq!(verdicts("2*2+1", "2*2=4\n"), vec![Some(1.0)]);
    assert_eq!(verdicts("2+1", "2*2=4\n"), vec![Some(0.0)]);
}

#[test]
fn arithmetic_negative_numbers_and_garbage() {
    assert_eq!(verdicts("3-8+2", "3-8=-5\n-5+2=-3\nA:-3\n"), vec![Some(1.0); 3]);
    assert_eq!(verdicts("-3*2", "-3*2=-6\nA:-6"), vec![Some(1.0); 2]);
    assert_eq!(verdicts("3-8+2", "3 - 8 = -5\nthree minus eight\n"), vec![Some(1.0), Some(0.0)]);
    assert_eq!(verdicts("not an expression", "1+1=2"), vec![None]);
}

#[test]
fn expression_numbers_mind_signs() {
    assert_eq!(expression_numbers("7+3*4-2"), Some(vec![7, 3, 4, 2]));
    assert_eq!(expression_numbers("-3*-2"), Some(vec![-3, -2]));
    assert_eq!(expression_numbers("3+"), None);
    assert_eq!(expression_numbers("3/4"), None);
}

#[test]
fn calculator_annotations() {
    let step = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs; 9 * 2 = $<<9*2=18>>18";
    let found = annotations(step);
    assert_eq!(found.len(), 2);
    assert_eq!((found[1].expr.as_str(), found[1].value.as_str()), ("9*2", "18"));
    assert_eq!(check_calculator(step, 1e-6), Some(true));
    assert_eq!(check_calculator("so <<9*2=19>>19", 1e-6), Some(false));
    assert_eq!(check_calculator("no annotation here", 1e-6), None);
    assert_eq!(check_calculator("<<import os=1>>", 1e-6), Some(false));
    // Rounded to the written decimals: 10/3 = 3.333... written 3.33.
    assert_eq!(check_calculator("<<10/3=3.33>>", 1e-6), Some(true));
    assert_eq!(check_calculator("<<10/3=3.34>>", 1e-6), Some(false));
    // A value written as a fraction.
    assert_eq!(check_calculator("<<3/4=3/4>>", 1e-6), Some(true));
}

#[test]
fn step_verifier_for_task() {
    use crate::config::StepVerifierKind;
    use prism_core::PromptId;
    let p = Prompt {
        id: PromptId(0),
        task: "arithmetic".into(),
        problem: "Q:7+3*4-2".into(),
        text: "Q:7+3*4-2\n".into(),
        reference: None,
    };
    let v = StepVerifier::for_task(StepVerifierKind::Auto, "arithmetic", 1e-6);
    assert_eq!(v.score(&p, &["3*4=12", "7+12=20"]), vec![Some(1.0), Some(0.0)]);
    let v = StepVerifier::for_task(StepVerifierKind::Auto, "gsm8k", 1e-6);
    assert_eq!(v, StepVerifier::Calculator { tolerance: 1e-6 });
}

/// Every `<<expr=value>>` in GSM8K's test set evaluates to the value written.
/// Exceptions, if any, are printed with their line numbers; there are none
/// (checked with this parser, and independently with Python's `eval`).
#[test]
fn every_gsm8k_test_annotation_evaluates_to_its_value() {
    let path = crate::testkit::data_dir().join("gsm8k/test.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut checked = 0;
    let mut exceptions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        for a in annotations(row["answer"].as_str().unwrap()) {
            checked += 1;
            match check_annotation(&a, 1e-6) {
                Ok(true) => {}
                Ok(false) => exceptions.push(format!(
                    "line {}: <<{}={}>> evaluates to {:?}",
                    i + 1,
                    a.expr,
                    a.value,
                    crate::expr::eval(&a.expr)
                )),
                Err(e) => exceptions.push(format!("line {}: <<{}={}>>: {e}", i + 1, a.expr, a.value)),
            }
        }
    }
    println!("checked {checked} annotations, {} exceptions", exceptions.len());
    for e in &exceptions {
        println!("  {e}");
    }
    assert_eq!(checked, 4282);
    assert!(exceptions.is_empty(), "{exceptions:#?}");
}
