//! The payload of a run's judged stream: the steps one reward process's judge
//! scored, which every other reward process's distilled model learns from.

use prism_proto::{convert, v1};
use prism_reward::JudgedStep;
use prost::Message;

/// `steps` scored by `worker`'s judge, as one entry of the judged stream.
pub fn encode(worker: &str, steps: &[JudgedStep]) -> Vec<u8> {
    v1::JudgedSteps {
        worker_id: worker.to_string(),
        steps: steps.iter().map(|s| v1::JudgedStep { context: s.context.clone(), step: s.step.clone(), p: s.p, check: s.check }).collect(),
    }
    .encode_to_vec()
}

/// Decodes [`encode`]'s payload; a target that is not a probability makes the
/// entry malformed (a distilled model must never learn from one).
pub fn decode(bytes: &[u8]) -> Result<Vec<JudgedStep>, String> {
    let m = convert::decode::<v1::JudgedSteps>("JudgedSteps", bytes).map_err(|e| e.to_string())?;
    m.steps
        .into_iter()
        .map(|s| match s.p {
            p if (0.0..=1.0).contains(&p) => Ok(JudgedStep { context: s.context, step: s.step, p, check: s.check }),
            p => Err(format!("step target {p} is not a probability")),
        })
        .collect()
}
