use super::*;
use std::path::Path;
use tch::Device;

/// A bigram language model: the logits of the next token are the row of a
/// `[V, V]` table picked by the current token. Small enough to mirror in PyTorch.
struct Bigram {
    vs: nn::VarStore,
    table: Tensor,
}

impl Bigram {
    fn new(values: &[f32], v: i64) -> Self {
        let vs = nn::VarStore::new(Device::Cpu);
        let table = vs.root().var_copy("table", &Tensor::from_slice(values).view([v, v]));
        Self { vs, table }
    }
}

impl TokenModel for Bigram {
    fn logits(&self, input_ids: &Tensor) -> Tensor {
        let (b, t) = (input_ids.size()[0], input_ids.size()[1]);
        self.table.index_select(0, &input_ids.flatten(0, -1)).view([b, t, -1])
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn vocab_size(&self) -> usize {
        self.table.size()[0] as usize
    }
}

const V: i64 = 7;

fn table(seed: f32) -> Vec<f32> {
    (0..V * V).map(|k| ((k as f32) * 0.37 + seed).sin() * 1.5).collect()
}

fn prm(cfg: &Config, phi: &[f32], reference: &[f32]) -> ImplicitPrm {
    ImplicitPrm::new(cfg, Box::new(Bigram::new(phi, V)), Box::new(Bigram::new(reference, V))).unwrap()
}

#[test]
fn with_phi_equal_to_the_reference_every_step_reward_is_zero() {
    let p = prm(&Config::default(), &table(0.3), &table(0.3));
    let rewards = p.step_rewards(&[1, 2], &[3, 4, 5, 6, 0], &[0..2, 2..5]).unwrap();
    assert_eq!(rewards, vec![0.0, 0.0]);
    assert_eq!(p.token_rewards(&[1], &[2, 3]).unwrap(), vec![0.0, 0.0]);
    assert_eq!(p.metrics().scored, 1);
}

#[test]
fn one_update_raises_a_correct_trajectorys_log_ratios_and_lowers_a_wrong_ones() {
    let cfg = Config { beta: 0.5, lr: 0.05 };
    let p = prm(&cfg, &table(0.3), &table(0.3));
    let sum = |p: &ImplicitPrm, c: &[u32]| p.token_rewards(&[1, 2], c).unwrap().iter().sum::<f32>();
    p.update(&[1, 2], &[3, 4, 5], 1.0).unwrap();
    assert!(sum(&p, &[3, 4, 5]) > 0.01, "{}", sum(&p, &[3, 4, 5]));
    let p = prm(&cfg, &table(0.3), &table(0.3));
    p.update(&[1, 2], &[3, 4, 5], 0.0).unwrap();
    assert!(sum(&p, &[3, 4, 5]) < -0.01);
    assert_eq!(p.metrics().updates, 1);
}

/// Scoring and learning from one forward pass gives what scoring, then
/// learning, gives.
#[test]
fn score_and_update_is_step_rewards_then_update() {
    let cfg = Config { beta: 0.5, lr: 0.05 };
    let (a, b) = (prm(&cfg, &table(0.9), &table(0.3)), prm(&cfg, &table(0.9), &table(0.3)));
    let (prompt, completion, spans) = ([1, 2], [3, 4, 5, 6], [0..1, 1..4]);
    let first = a.step_rewards(&prompt, &completion, &spans).unwrap();
    a.update(&prompt, &completion, 1.0).unwrap();
    assert_eq!(b.score_and_update(&prompt, &completion, &spans, Some(1.0)).unwrap(), first);
    assert_eq!(a.token_rewards(&prompt, &completion).unwrap(), b.token_rewards(&prompt, &completion).unwrap());
    assert_eq!((b.metrics().updates, b.metrics().scored), (1, 1));
    // Without an outcome, nothing is learned.
    b.score_and_update(&prompt, &completion, &spans, None).unwrap();
    assert_eq!(b.metrics().updates, 1);
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let p = prm(&Config::default(), &table(0.3), &table(0.3));
    let e = p.token_rewards(&[1], &[3, 9]).unwrap_err().to_string();
    assert!(e.contains("token id 9") && e.contains("vocabulary of 7"), "{e}");
    assert!(p.token_rewards(&[], &[3]).unwrap_err().to_string().contains("empty prompt"));
    assert!(p.step_rewards(&[1], &[3, 4], &[1..3]).unwrap_err().to_string().contains("1..3"));
    assert!(p.update(&[1], &[3], f32::NAN).is_err());
    assert_eq!(p.token_rewards(&[1], &[]).unwrap(), Vec::<f32>::new());
}

const REFERENCE: &str = r#"
import json, sys, torch
d = json.load(sys.stdin)
V, beta = d["V"], d["beta"]
phi = torch.tensor(d["phi"], dtype=torch.float32).view(V, V).requires_grad_(True)
ref = torch.tensor(d["ref"], dtype=torch.float32).view(V, V)
opt = torch.optim.Adam([phi], lr=d["lr"])
def ratio(prompt, completion):
    ids = torch.tensor(prompt + completion)
    p, c = len(prompt), len(completion)
    ctx, tgt = ids[p - 1:p + c - 1], ids[p:]
    lp = lambda t: torch.log_softmax(t[ctx], -1).gather(1, tgt.view(-1, 1)).view(-1)
    return lp(phi) - lp(ref).detach()
out = {"rewards": [], "losses": []}
for prompt, completion, outcome in d["steps"]:
    out["rewards"].append((beta * ratio(prompt, completion)).tolist())
    r = beta * ratio(prompt, completion).sum()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(r, torch.tensor(float(outcome)))
    opt.zero_grad(); loss.backward(); opt.step()
    out["losses"].append(loss.item())
out["phi"] = phi.detach().view(-1).tolist()
print(json.dumps(out))
"#;

/// The token rewards and three online updates (Adam) against PyTorch on the
/// same bigram tables: rewards, losses and φ's weights within 1e-5.
#[test]
fn rewards_and_updates_match_pytorch() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup", python.display());
    let cfg = Config { beta: 0.5, lr: 0.01 };
    let (phi, reference) = (table(0.9), table(0.3));
    let steps: Vec<(Vec<u32>, Vec<u32>, f32)> =
        vec![(vec![1, 2], vec![3, 4, 5, 6, 0], 1.0), (vec![4], vec![2, 2, 6], 0.0), (vec![0, 5], vec![1, 3], 1.0)];
    let p = prm(&cfg, &phi, &reference);
    let (mut rewards, mut losses) = (Vec::new(), Vec::new());
    for (prompt, completion, outcome) in &steps {
        rewards.push(p.token_rewards(prompt, completion).unwrap());
        losses.push(p.update(prompt, completion, *outcome).unwrap());
    }
    let input = serde_json::json!({
        "V": V, "beta": cfg.beta, "lr": cfg.lr, "phi": phi, "ref": reference, "steps": steps,
    });
    let mut child = std::process::Command::new(python)
        .args(["-c", REFERENCE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let close = |got: &[f32], want: &serde_json::Value, what: &str| {
        let want: Vec<f64> = want.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{what}: {got:?} vs {want:?}");
        }
    };
    for (i, r) in rewards.iter().enumerate() {
        close(r, &want["rewards"][i], &format!("rewards before update {i}"));
        assert!(r.iter().any(|x| x.abs() > 1e-3), "φ differs from the reference, so the rewards are not all 0");
    }
    let losses: Vec<f32> = losses.iter().map(|&l| l as f32).collect();
    close(&losses, &want["losses"], "losses");
    // φ's weights after the three steps; the reference did not move.
    let s = p.state();
    let weights = |m: &dyn TokenModel| Vec::<f32>::try_from(m.var_store().variables()["table"].detach().flatten(0, -1)).unwrap();
    close(&weights(s.phi.as_ref()), &want["phi"], "φ after the updates");
    assert_eq!(weights(s.reference.as_ref()), reference);
}

fn implicit_labeler() -> crate::Labeler {
    let cfg = crate::Config { process: crate::config::Process::Implicit, ..crate::Config::default() };
    crate::Labeler::new(&cfg, &crate::judge::Config::default(), &crate::distill::Config::default()).unwrap()
}

/// A correct arithmetic trajectory with token ids inside the bigram's vocabulary.
fn correct_trajectory() -> prism_core::Trajectory {
    let mut t = crate::testkit::trajectory(1, "arithmetic", "2+2", None, "2+2=4\nA:4\n");
    t.prompt_tokens = vec![1, 2];
    t.tokens = t.text.bytes().map(|b| u32::from(b) % V as u32).collect();
    t
}

/// `reward.process = "implicit"`: with φ equal to the reference every step
/// scores σ(0) = 0.5 (source `implicit`) and φ learns from the verifier's
/// outcome; labeled again, the correct trajectory's steps score above one half.
#[tokio::test]
async fn the_labeler_scores_steps_with_the_implicit_prm_and_trains_it_on_outcomes() {
    let prm = prm(&Config { beta: 0.5, lr: 0.05 }, &table(0.3), &table(0.3));
    let labeler = implicit_labeler().with_implicit(prm);
    let t = correct_trajectory();
    let first = labeler.label(&t).await;
    assert_eq!(first.outcome, 1.0);
    assert_eq!(first.steps.len(), 2);
    for s in &first.steps {
        assert_eq!((s.score, s.source), (Some(0.5), prism_core::ScoreSource::Implicit));
    }
    assert_eq!(labeler.metrics().implicit.unwrap().updates, 1);
    assert_eq!(labeler.metrics().sources.implicit, 2);
    let again = labeler.label(&t).await;
    let logit = |p: f32| (p / (1.0 - p)).ln();
    let total: f32 = again.steps.iter().map(|s| logit(s.score.unwrap())).sum();
    assert!(total > 0.0, "{:?}", again.steps);
    let health = labeler.health();
    assert_eq!(health.implicit_updates, Some(2));
    assert!(health.implicit_loss.is_some());
}

/// Without an attached PRM, or with a trajectory it cannot score, steps are
/// unknown (never a made-up score) and the failure is counted.
#[tokio::test]
async fn missing_or_failing_implicit_prm_leaves_steps_unknown_and_counted() {
    let labeler = implicit_labeler();
    let label = labeler.label(&correct_trajectory()).await;
    assert!(label.steps.iter().all(|s| s.score.is_none() && s.source == prism_core::ScoreSource::Unknown));
    assert_eq!(labeler.metrics().implicit_failures, 1);
    let labeler = implicit_labeler().with_implicit(prm(&Config::default(), &table(0.3), &table(0.3)));
    let mut t = correct_trajectory();
    t.tokens[0] = 99;
    let label = labeler.label(&t).await;
    assert!(label.steps.iter().all(|s| s.score.is_none()));
    assert_eq!(labeler.metrics().implicit_failures, 1);
}
