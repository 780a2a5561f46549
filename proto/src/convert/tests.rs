use super::*;
use prism_core::{
    FinishReason, GroupId, LabeledTrajectory, PolicyVersion, Prompt, PromptId, RewardLabel, ScoreSource, Step,
    StepScore, Trajectory, TrajectoryId,
};

fn trajectory() -> Trajectory {
    let text = "3*4=12\n7+12=19\nA:19\n".to_string();
    Trajectory {
        id: TrajectoryId(41),
        group: GroupId(7),
        sample: 2,
        group_size: 4,
        prompt: Prompt {
            id: PromptId(3),
            task: "arithmetic".into(),
            problem: "7+3*4".into(),
            text: "Q:7+3*4\n".into(),
            reference: Some("19".into()),
        },
        policy_version: PolicyVersion(12),
        prompt_tokens: vec![1, 2, 3, 70_000],
        tokens: vec![5, 6, 7, 8],
        logprobs: vec![-0.5, -1.25, f32::MIN_POSITIVE, -0.0],
        token_ends: vec![7, 15, 18, text.len() as u32],
        text,
        finish: FinishReason::Stop,
        generate_ms: 1234,
        version_changes: Vec::new(),
    }
}

fn label() -> RewardLabel {
    RewardLabel {
        outcome: 1.0,
        outcome_source: ScoreSource::Verifier,
        answer: Some("19".into()),
        steps: vec![
            StepScore { step: Step { text: 0..7, tokens: 0..1 }, score: Some(0.75), source: ScoreSource::Judge },
            StepScore { step: Step { text: 7..15, tokens: 1..2 }, score: None, source: ScoreSource::Unknown },
            StepScore { step: Step { text: 15..19, tokens: 2..4 }, score: Some(0.0), source: ScoreSource::JudgeCache },
        ],
    }
}

#[test]
fn trajectory_round_trips_through_bytes() {
    let t = trajectory();
    let bytes = v1::Trajectory::from(&t).encode_to_vec();
    let back: Trajectory = decode::<v1::Trajectory>("Trajectory", &bytes).unwrap().try_into().unwrap();
    assert_eq!(back, t);
}

/// Version changes of an in-flight update travel; out-of-order or
/// out-of-range ones are refused by name.
#[test]
fn version_changes_round_trip_and_bad_ones_are_refused() {
    let mut t = trajectory();
    t.version_changes = vec![(1, PolicyVersion(13)), (3, PolicyVersion(15))];
    let wire = v1::Trajectory::from(&t);
    let back: Trajectory = decode::<v1::Trajectory>("Trajectory", &wire.encode_to_vec()).unwrap().try_into().unwrap();
    assert_eq!(back, t);
    for (changes, what) in [
        (vec![(1, 12)], "not above policy_version"),
        (vec![(2, 13), (2, 14)], "token not increasing"),
        (vec![(1, 14), (2, 13)], "version not increasing"),
        (vec![(5, 13)], "past the tokens"),
    ] {
        let mut bad = wire.clone();
        bad.version_changes = changes.iter().map(|&(token, version)| v1::VersionChange { token, version }).collect();
        let err = Trajectory::try_from(bad).unwrap_err().to_string();
        assert!(err.contains("trajectory 41") && err.contains("version change"), "{what}: {err}");
    }
}

#[test]
fn labeled_trajectory_round_trips_with_unknown_step_scores() {
    let l = LabeledTrajectory { trajectory: trajectory(), label: label() };
    let wire = labeled_to_wire(&l, v1::Timings { sampled_at_ms: 10, label_ms: 20, labeled_at_ms: 30, generate_ms: 0 });
    // the transport's timings travel alongside; generate_ms comes from the trajectory
    let timings = wire.trajectory.as_ref().unwrap().timings.unwrap();
    assert_eq!((timings.generate_ms, timings.label_ms), (1234, 20));
    let bytes = wire.encode_to_vec();
    let back: LabeledTrajectory = decode::<v1::LabeledTrajectory>("LabeledTrajectory", &bytes).unwrap().try_into().unwrap();
    assert_eq!(back, l);
    assert_eq!(back.label.steps[1].score, None, "an unknown score stays unknown, never 0");
}

#[test]
fn every_enum_value_round_trips() {
    for f in [FinishReason::Eos, FinishReason::Stop, FinishReason::Length] {
        let mut t = trajectory();
        t.finish = f;
        let back: Trajectory = v1::Trajectory::from(&t).try_into().unwrap();
        assert_eq!(back.finish, f);
    }
    for s in [
        ScoreSource::Verifier,
        ScoreSource::Judge,
        ScoreSource::JudgeCache,
        ScoreSource::Distilled,
        ScoreSource::Guard,
        ScoreSource::Unknown,
    ] {
        let mut l = label();
        l.outcome_source = s;
        let back: RewardLabel = v1::RewardLabel::from(&l).try_into().unwrap();
        assert_eq!(back.outcome_source, s);
    }
}

#[test]
fn mismatched_per_token_arrays_are_refused_with_the_id() {
    let mut wire = v1::Trajectory::from(&trajectory());
    wire.logprobs.pop();
    let err = Trajectory::try_from(wire).unwrap_err();
    assert_eq!(err.to_string(), "trajectory 41: logprobs has 3 entries but tokens has 4");
}

#[test]
fn unknown_enum_and_missing_fields_are_refused() {
    let mut wire = v1::Trajectory::from(&trajectory());
    wire.finish = 0;
    assert_eq!(
        Trajectory::try_from(wire).unwrap_err().to_string(),
        "Trajectory: field `finish` has unknown enum value 0"
    );
    let mut wire = v1::Trajectory::from(&trajectory());
    wire.prompt = None;
    assert_eq!(Trajectory::try_from(wire).unwrap_err().to_string(), "Trajectory: missing field `prompt`");
    let wire = v1::LabeledTrajectory { trajectory: Some(v1::Trajectory::from(&trajectory())), label: None };
    assert!(LabeledTrajectory::try_from(wire).unwrap_err().to_string().contains("missing field `label`"));
}

#[test]
fn garbage_bytes_are_a_decode_error() {
    let err = decode::<v1::Trajectory>("Trajectory", &[0xff, 0xff, 0xff]).unwrap_err();
    assert!(matches!(err, ConvertError::Decode { message: "Trajectory", .. }), "{err}");
}

#[test]
fn label_results_round_trip_both_ways() {
    let ok: LabelResult = Ok(LabeledTrajectory { trajectory: trajectory(), label: label() });
    let bytes = label_result_to_wire(&ok, Default::default()).encode_to_vec();
    assert_eq!(label_result_from_wire(decode("LabelResult", &bytes).unwrap()).unwrap(), ok);
    let failed: LabelResult = Err(LabelFailure { trajectory: trajectory(), error: "judge timed out after 3 tries".into() });
    let bytes = label_result_to_wire(&failed, Default::default()).encode_to_vec();
    assert_eq!(label_result_from_wire(decode("LabelResult", &bytes).unwrap()).unwrap(), failed);
    let neither = v1::LabelResult { trajectory: Some((&trajectory()).into()), label: None, error: String::new() };
    assert!(label_result_from_wire(neither).unwrap_err().to_string().contains("missing field `label (or error)`"));
}
