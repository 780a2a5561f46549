use super::*;
use prism_core::PromptId;

fn prompt(task: &str, problem: &str, reference: Option<&str>) -> Prompt {
    Prompt {
        id: PromptId(0),
        task: task.into(),
        problem: problem.into(),
        text: format!("Q:{problem}\n"),
        reference: reference.map(str::to_string),
    }
}

fn verifier(kind: OutcomeKind, answer_regex: &str) -> OutcomeVerifier {
    OutcomeVerifier::new(&Config { outcome: kind, answer_regex: answer_regex.into(), ..Config::default() }).unwrap()
}

#[test]
fn arithmetic_answer_against_the_true_value() {
    let v = verifier(OutcomeKind::Auto, "");
    let p = prompt("arithmetic", "7+3*4-2", None);
    // 7 + 12 - 2 = 17 by hand.
    let ok = v.verify(&p, "3*4=12\n7+12=19\n19-2=17\nA:17\n");
    assert_eq!((ok.score, ok.answer.as_deref(), ok.source), (1.0, Some("17"), ScoreSource::Verifier));
    assert_eq!(v.verify(&p, "3*4=12\nA:19\n").score, 0.0);
    // No answer line: 0, and no answer.
    let none = v.verify(&p, "3*4=12\n7+12=19\n");
    assert_eq!((none.score, none.answer), (0.0, None));
    // Negative values.
    assert_eq!(v.verify(&prompt("arithmetic", "3-8+2", None), "3-8=-5\n-5+2=-3\nA:-3\n").score, 1.0);
    // The last answer line counts.
    assert_eq!(v.verify(&p, "A:3\nA:17\n").score, 1.0);
}

#[test]
fn numeric_gsm8k_forms() {
    let v = verifier(OutcomeKind::Numeric, "");
    let p = prompt("gsm8k", "q", Some("He makes 9 * 2 = $<<9*2=18>>18.\n#### 1,234"));
    for (completion, want) in [
        ("so the total is\n#### 1234", 1.0),
        ("#### $1,234.00", 1.0),
        ("The answer is 1234.0", 1.0),
        ("The answer is: $1,234", 1.0),
        ("we get \\boxed{1,234}", 1.0),
        ("first 5, then 1234", 1.0),
        ("#### 1235", 0.0),
        ("no number at all", 0.0),
    ] {
        assert_eq!(v.verify(&p, completion).score, want, "{completion:?}");
    }
    let p = prompt("gsm8k", "q", Some("#### 0.5"));
    assert_eq!(v.verify(&p, "#### 1/2").score, 1.0);
    assert_eq!(v.verify(&p, "#### 50%").score, 0.0, "50% is 50 here, not 0.5");
}

#[test]
fn contains_accepts_the_answer_anywhere() {
    let v = verifier(OutcomeKind::Contains, "");
    let p = prompt("jsonl", "Compute 3+4*5.", Some("23"));
    for (completion, want) in [("23", 1.0), ("4*5 = 20, 3 + 20 = 23. So 23.", 1.0), ("It is 23, or maybe 24", 1.0), ("24", 0.0), ("2 3", 0.0), ("none", 0.0)] {
        assert_eq!(v.verify(&p, completion).score, want, "{completion:?}");
    }
}

#[test]
fn tolerance_is_relative_above_one() {
    assert!(numbers_match(1000.0005, 1000.0, 1e-6));
    assert!(!numbers_match(1000.01, 1000.0, 1e-6));
    assert!(numbers_match(1e-7, 0.0, 1e-6));
}

#[test]
fn boxed_extraction_balances_braces_and_takes_the_last() {
    assert_eq!(extract_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}").as_deref(), Some("\\frac{1}{2}"));
    assert_eq!(extract_boxed("\\boxed 7 done").as_deref(), Some("7"));
    assert_eq!(extract_boxed("\\boxed{unclosed"), None);
    assert_eq!(extract_boxed("no box"), None);
}

#[test]
fn normalisation() {
    assert_eq!(normalize("\\left( 1, 2 \\right)"), "(1,2)");
    assert_eq!(normalize("\\dfrac{1}{2}"), "1/2");
    assert_eq!(normalize("\\frac12"), "1/2");
    assert_eq!(normalize("\\frac{x+1}{2}"), "(x+1)/2");
    assert_eq!(normalize("\\text{ 5 apples }"), "5apples");
    assert_eq!(normalize("90^\\circ"), "90");
    assert_eq!(normalize("\\$5."), "5");
    assert!(answers_match("\\dfrac{3}{4}", "0.75", 1e-6));
    assert!(answers_match("\\tfrac34", "\\frac{3}{4}", 1e-6));
    assert!(answers_match("\\frac{-3}{4}", "-0.75", 1e-6));
    assert!(answers_match("\\text{(B)}", "(B)", 1e-6));
    assert!(answers_match("x^2 + 1", "x^2+1", 1e-6));
    assert!(!answers_match("x^2+2", "x^2+1", 1e-6));
    assert!(!answers_match("", "", 1e-6), "an empty answer matches nothing");
}

#[test]
fn boxed_outcome_with_latex_reference() {
    let v = verifier(OutcomeKind::Auto, "");
    let p = prompt("math", "q", Some("\\frac{1}{2}"));
    assert_eq!(v.verify(&p, "So \\boxed{\\dfrac{1}{2}}.").score, 1.0);
    assert_eq!(v.verify(&p, "So \\boxed{0.5}").score, 1.0);
    assert_eq!(v.verify(&p, "So \\boxed{0.6}").score, 0.0);
    // No reference: the score is unknown, not a silent 0 from a verifier.
    let out = v.verify(&prompt("math", "q", None), "\\boxed{3}");
    assert_eq!((out.source, out.answer.as_deref()), (ScoreSource::Unknown, Some("3")));
}

#[test]
fn configurable_answer_regex() {
    let v = verifier(OutcomeKind::Regex, r"ANSWER=\[(.+?)\]");
    let p = prompt("any", "q", Some("42"));
    assert_eq!(v.verify(&p, "blah ANSWER=[41] no, ANSWER=[42]").score, 1.0);
    assert_eq!(v.verify(&p, "The answer is 42").answer, None);
    // With `numeric`, the regex is tried first and the usual forms after it.
    let v = verifier(OutcomeKind::Numeric, r"RESULT (\d+)");
    assert_eq!(v.verify(&p, "#### 7\nRESULT 42").score, 1.0);
    assert_eq!(v.verify(&p, "#### 42").score, 1.0);
}

#[test]
fn every_gsm8k_test_answer_parses_to_a_number() {
    let path = crate::testkit::data_dir().join("gsm8k/test.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v = verifier(OutcomeKind::Numeric, "");
    let mut failures = Vec::new();
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let answer = row["answer"].as_str().unwrap();
        n += 1;
        let reference = reference_answer(answer);
        match parse_number(&reference) {
            // The reference solution, read as a completion, is right.
            Some(_) => {
                let p = prompt("gsm8k", row["question"].as_str().unwrap(), Some(answer));
                if v.verify(&p, answer).score != 1.0 {
                    failures.push(format!("line {}: reference solution does not verify", i + 1));
                }
            }
            None => failures.push(format!("line {}: {reference:?} is not a number", i + 1)),
        }
    }
    assert_eq!(n, 1319);
    assert!(failures.is_empty(), "{failures:#?}");
}
