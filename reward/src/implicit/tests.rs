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
    let cfg = Config { beta: 0.5, lr: 0.05, ..Config::default() };
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
    let cfg = Config { beta: 0.5, lr: 0.05, ..Config::default() };
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
for batch in d["batches"]:
    for prompt, completion, _ in batch:
        out["rewards"].append((beta * ratio(prompt, completion)).tolist())
    r = torch.stack([beta * ratio(p, c).sum() for p, c, _ in batch])
    y = torch.tensor([float(o) for _, _, o in batch])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(r, y)
    opt.zero_grad(); loss.backward(); opt.step()
    out["losses"].append(loss.item())
out["phi"] = phi.detach().view(-1).tolist()
print(json.dumps(out))
"#;

/// The token rewards and four online updates (Adam) against PyTorch on the
/// same bigram tables: three one trajectory at a time, then a padded batch of
/// three of different lengths (one step on the mean loss). Rewards, losses and
/// φ's weights within 1e-5.
#[test]
fn rewards_and_updates_match_pytorch() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup", python.display());
    let cfg = Config { beta: 0.5, lr: 0.01, ..Config::default() };
    let (phi, reference) = (table(0.9), table(0.3));
    type Traj = (Vec<u32>, Vec<u32>, f32);
    let batches: Vec<Vec<Traj>> = vec![
        vec![(vec![1, 2], vec![3, 4, 5, 6, 0], 1.0)],
        vec![(vec![4], vec![2, 2, 6], 0.0)],
        vec![(vec![0, 5], vec![1, 3], 1.0)],
        vec![(vec![6], vec![1, 1, 2, 3, 5, 1], 0.0), (vec![2, 3, 4], vec![0], 1.0), (vec![5, 5], vec![4, 4, 4], 1.0)],
    ];
    let p = prm(&cfg, &phi, &reference);
    let (mut rewards, mut losses) = (Vec::new(), Vec::new());
    for batch in &batches[..3] {
        let (prompt, completion, outcome) = &batch[0];
        rewards.push(p.token_rewards(prompt, completion).unwrap());
        losses.push(p.update(prompt, completion, *outcome).unwrap());
    }
    // The batch: each token is its own step, so the step rewards are the
    // token rewards; the loss is read back from the metrics' moving average.
    let before = p.metrics().loss.unwrap();
    let items = batches[3]
        .iter()
        .map(|(prompt, completion, outcome)| Item {
            prompt: prompt.clone(),
            completion: completion.clone(),
            spans: (0..completion.len() as u32).map(|k| k..k + 1).collect(),
            outcome: Some(*outcome),
        })
        .collect();
    for r in p.score_batch(items) {
        rewards.push(r.unwrap());
    }
    losses.push((p.metrics().loss.unwrap() - 0.95 * before) / 0.05);
    assert_eq!((p.metrics().batches, p.metrics().updates), (4, 6));
    let input = serde_json::json!({
        "V": V, "beta": cfg.beta, "lr": cfg.lr, "phi": phi, "ref": reference, "batches": batches,
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
    assert_eq!(rewards.len(), 6);
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
    let prm = prm(&Config { beta: 0.5, lr: 0.05, ..Config::default() }, &table(0.3), &table(0.3));
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

/// A batch scores each trajectory exactly as it scores alone, on the real
/// transformer too: rows of different lengths are padded on the right, which
/// a causal model never sees.
#[test]
fn a_padded_batch_scores_every_trajectory_as_it_scores_alone() {
    let model = |seed| {
        let config = prism_model::builtin::tiny_arith_config();
        Box::new(prism_model::Transformer::new(config, Device::Cpu, prism_model::Dtype::F32, seed).unwrap()) as Box<dyn TokenModel>
    };
    let p = ImplicitPrm::new(&Config { beta: 1.0, ..Config::default() }, model(1), model(2)).unwrap();
    let rows: Vec<(Vec<u32>, Vec<u32>)> =
        vec![(vec![3, 4, 5], vec![6, 7, 8, 9, 10, 11, 12]), (vec![9], vec![4, 4]), (vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9])];
    let alone: Vec<Vec<f32>> = rows.iter().map(|(prompt, c)| p.token_rewards(prompt, c).unwrap()).collect();
    assert!(alone.iter().flatten().any(|r| r.abs() > 1e-3), "φ and the reference differ");
    let items = rows
        .iter()
        .map(|(prompt, c)| Item {
            prompt: prompt.clone(),
            completion: c.clone(),
            spans: (0..c.len() as u32).map(|k| k..k + 1).collect(),
            outcome: None,
        })
        .collect();
    let batched: Vec<Vec<f32>> = p.score_batch(items).into_iter().map(Result::unwrap).collect();
    for (a, b) in alone.iter().zip(&batched) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{alone:?} vs {batched:?}");
        }
    }
    assert_eq!(p.metrics().updates, 0, "no outcome, nothing learned");
}

/// A bad trajectory in a batch gets its own error; the others are scored.
#[test]
fn a_bad_item_fails_alone() {
    let p = prm(&Config::default(), &table(0.9), &table(0.3));
    let item = |prompt: Vec<u32>, completion: Vec<u32>, spans: Vec<Range<u32>>, outcome| Item { prompt, completion, spans, outcome };
    let results = p.score_batch(vec![
        item(vec![1], vec![2, 3], vec![0..2], Some(1.0)),
        item(vec![1], vec![2, 9], vec![0..2], Some(1.0)),
        item(vec![], vec![2], vec![0..1], None),
        item(vec![1], vec![2], vec![0..3], None),
        item(vec![1], vec![2], vec![0..1], Some(f32::NAN)),
        item(vec![1], vec![], vec![], Some(0.0)),
    ]);
    let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors[0].contains("token id 9") && errors[1].contains("empty prompt"), "{errors:?}");
    assert!(errors[2].contains("0..3") && errors[3].contains("NaN"), "{errors:?}");
    let fresh = prm(&Config::default(), &table(0.9), &table(0.3));
    assert_eq!(results[0].as_ref().unwrap(), &fresh.step_rewards(&[1], &[2, 3], &[0..2]).unwrap());
    assert_eq!(results[5].as_ref().unwrap(), &Vec::<f32>::new());
    assert_eq!(p.metrics().updates, 1, "only the good labeled trajectory was learned from");
}

/// Labels that arrive while a batch runs share the next one: with the PRM
/// busy (its state held) on a first label, four more queue and then run as
/// one batch, and each gets what it gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_labels_share_batches() {
    let p = Arc::new(prm(&Config::default(), &table(0.9), &table(0.3)));
    let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..5u32).map(|k| (vec![k % 7, 1], (0..=k).map(|j| (j * 3 + k) % 7).collect())).collect();
    let alone: Vec<Vec<f32>> = rows.iter().map(|(prompt, c)| p.step_rewards(prompt, c, &[0..c.len() as u32]).unwrap()).collect();
    let batches = p.metrics().batches;
    let busy = p.state();
    let label = |(prompt, c): &(Vec<u32>, Vec<u32>)| {
        let (p, item) = (p.clone(), Item { prompt: prompt.clone(), completion: c.clone(), spans: vec![0..c.len() as u32], outcome: None });
        tokio::spawn(async move { p.score(item).await })
    };
    let wait_until = |done: &dyn Fn(&Queue) -> bool| {
        let waited = std::time::Instant::now();
        while !done(&p.queue()) {
            assert!(waited.elapsed().as_secs() < 10, "the queue did not reach the expected state");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    };
    let mut tasks = vec![label(&rows[0])];
    // The first label's batch has started and waits for the state.
    wait_until(&|q| q.draining && q.waiting.is_empty());
    tasks.extend(rows[1..].iter().map(label));
    wait_until(&|q| q.waiting.len() == 4);
    drop(busy);
    for (task, want) in tasks.into_iter().zip(&alone) {
        let got = task.await.unwrap().unwrap();
        assert!((got[0] - want[0]).abs() < 1e-5, "{got:?} vs {want:?}");
    }
    assert_eq!(p.metrics().batches - batches, 2, "{:?}", p.metrics());
    // The drain ends once nobody waits (it may still be finishing its loop
    // when the last answer arrives).
    wait_until(&|q| !q.draining && q.waiting.is_empty());
}

/// A model that panics on token 6 (as libtorch does on bad shapes).
struct Panicky(Bigram);

impl TokenModel for Panicky {
    fn logits(&self, input_ids: &Tensor) -> Tensor {
        assert!(!Vec::<i64>::try_from(input_ids.flatten(0, -1)).unwrap().contains(&6), "token 6 is cursed");
        self.0.logits(input_ids)
    }

    fn var_store(&self) -> &nn::VarStore {
        self.0.var_store()
    }

    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
}

/// A panic inside a batch fails that batch's labels with the reason; the
/// queue goes on, and the next label is scored.
#[tokio::test]
async fn a_panicking_batch_fails_its_labels_and_the_queue_goes_on() {
    let p = Arc::new(
        ImplicitPrm::new(&Config::default(), Box::new(Panicky(Bigram::new(&table(0.9), V))), Box::new(Bigram::new(&table(0.3), V)))
            .unwrap(),
    );
    let item = |c: Vec<u32>| Item { prompt: vec![1], spans: vec![0..c.len() as u32], completion: c, outcome: Some(1.0) };
    let e = p.score(item(vec![2, 6])).await.unwrap_err().to_string();
    assert!(e.contains("token 6 is cursed"), "{e}");
    assert_eq!(p.score(item(vec![2, 3])).await.unwrap().len(), 1);
    assert_eq!(p.metrics().updates, 1);
}

/// A checkpoint keeps φ: a fresh implicit PRM loaded from what a trained one
/// saved gives the same rewards and metrics; a folder without one is no
/// error; a φ of another shape is refused by file name.
#[test]
fn a_saved_implicit_prm_continues_where_it_stopped() {
    let cfg = Config { beta: 0.5, lr: 0.05, ..Config::default() };
    let p = prm(&cfg, &table(0.3), &table(0.3));
    for k in 0..3 {
        p.update(&[1, 2], &[3, 4, 5], (k % 2) as f32).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    p.save(dir.path()).unwrap();
    // A resumed run builds both models from its (later) policy; the saved
    // reference is the one RL started from.
    let q = prm(&cfg, &table(0.7), &table(0.7));
    assert!(q.load(dir.path()).unwrap());
    assert_eq!(q.token_rewards(&[1, 2], &[3, 4, 5]).unwrap(), p.token_rewards(&[1, 2], &[3, 4, 5]).unwrap());
    assert_eq!(q.metrics(), p.metrics());
    assert!(!prm(&cfg, &table(0.3), &table(0.3)).load(tempfile::tempdir().unwrap().path()).unwrap());
    let small = ImplicitPrm::new(&cfg, Box::new(Bigram::new(&[0.0; 4], 2)), Box::new(Bigram::new(&[0.0; 4], 2))).unwrap();
    let e = small.load(dir.path()).unwrap_err().to_string();
    assert!(e.contains(SAVED_PHI) && e.contains("table"), "{e}");
}
