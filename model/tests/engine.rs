//! The sampling engine on the built-in tiny-arith model: batching, seeds,
//! truncation sets, behaviour log-probabilities, stopping, scoring.

use prism_core::FinishReason;
use prism_model::engine::{self, SamplingParams};
use prism_model::{LoadOptions, Loaded, load};
use tch::{Kind, Tensor};

fn tiny(seed: u64) -> Loaded {
    load("builtin:tiny-arith", &LoadOptions { seed, ..Default::default() }).unwrap()
}

fn encode(m: &Loaded, text: &str) -> Vec<u32> {
    m.tokenizer.encode(text, true).unwrap()
}

/// Model log-probabilities at every position of `ids` (float32 `[T, V]`).
fn logprobs_at(m: &Loaded, ids: &[u32]) -> Tensor {
    let input = Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    tch::no_grad(|| m.model.forward(&input, None)).squeeze_dim(0).log_softmax(-1, Kind::Float)
}

#[test]
fn tiny_arith_preset_is_small_and_seeded() {
    let a = tiny(1);
    let c = a.model.config();
    assert!((500_000..=1_000_000).contains(&c.num_parameters()), "{} parameters", c.num_parameters());
    let numel: i64 = a.model.var_store().trainable_variables().iter().map(|t| t.numel() as i64).sum();
    assert_eq!(numel as usize, c.num_parameters());
    assert_eq!(a.tokenizer.decode(&encode(&a, "Q:7+3*4-2\n"), false).unwrap(), "Q:7+3*4-2\n");
    assert_eq!(encode(&a, "Q:12\n").len(), 5, "one token per character");
    let x = Tensor::from_slice(&[4i64, 5, 12]).unsqueeze(0);
    let same = (tch::no_grad(|| tiny(1).model.forward(&x, None)) - tch::no_grad(|| a.model.forward(&x, None))).abs().max();
    assert_eq!(same.double_value(&[]), 0.0, "same seed, same weights");
    let other = (tch::no_grad(|| tiny(2).model.forward(&x, None)) - tch::no_grad(|| a.model.forward(&x, None))).abs().max();
    assert!(other.double_value(&[]) > 0.0, "another seed, other weights");
}

#[test]
fn batched_greedy_equals_each_prompt_alone() {
    let m = tiny(3);
    let prompts: Vec<Vec<u32>> = ["Q:1+2\n", "Q:7+3*4-2\n", "Q:9\n", "Q:12*12-100+5\n"].iter().map(|t| encode(&m, t)).collect();
    let params = SamplingParams::greedy(20, vec![]);
    let batched = engine::generate(&m.model, &prompts, &params).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = engine::generate(&m.model, std::slice::from_ref(p), &params).unwrap();
        assert_eq!(batched[i][0].tokens, alone[0][0].tokens, "prompt {i}");
        for (a, b) in batched[i][0].logprobs.iter().zip(&alone[0][0].logprobs) {
            assert!((a - b).abs() < 1e-4, "prompt {i}: logprob {a} vs {b}");
        }
    }
}

#[test]
fn a_seed_reproduces_samples_and_n_shares_the_prompt() {
    let m = tiny(4);
    let prompts = vec![encode(&m, "Q:3+4\n"), encode(&m, "Q:5*6-7\n")];
    let params = SamplingParams { n: 4, temperature: 1.0, max_new_tokens: 16, seed: 11, ..Default::default() };
    let a = engine::generate(&m.model, &prompts, &params).unwrap();
    let b = engine::generate(&m.model, &prompts, &params).unwrap();
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|g| g.len() == 4));
    assert_eq!(a, b, "same seed, same samples");
    let c = engine::generate(&m.model, &prompts, &SamplingParams { seed: 12, ..params.clone() }).unwrap();
    assert_ne!(a, c, "another seed, other samples");
    let distinct: std::collections::HashSet<_> = a[0].iter().map(|s| s.tokens.clone()).collect();
    assert!(distinct.len() > 1, "the n samples of a prompt differ");
}

/// At temperature 1 with no truncation, a sample's behaviour log-probs are the
/// model's teacher-forced log-probs (engine::score); at another temperature
/// they are those of the tempered softmax.
#[test]
fn behaviour_logprobs_are_those_of_the_sampling_distribution() {
    let m = tiny(5);
    let prompt = encode(&m, "Q:8-3*2\n");
    for temperature in [1.0f32, 0.7] {
        let params = SamplingParams { n: 3, temperature, max_new_tokens: 12, seed: 1, ..Default::default() };
        for s in &engine::generate(&m.model, std::slice::from_ref(&prompt), &params).unwrap()[0] {
            let ids: Vec<u32> = prompt.iter().chain(&s.tokens).copied().collect();
            let input = Tensor::from_slice(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
            let logits = tch::no_grad(|| m.model.forward(&input, None)).squeeze_dim(0);
            let tempered = (logits / temperature as f64).log_softmax(-1, Kind::Float);
            for (j, (&tok, &lp)) in s.tokens.iter().zip(&s.logprobs).enumerate() {
                let want = tempered.double_value(&[(prompt.len() + j - 1) as i64, tok as i64]) as f32;
                assert!((lp - want).abs() < 1e-4, "T={temperature} token {j}: {lp} vs {want}");
            }
            if temperature == 1.0 {
                let scored = engine::score(&m.model, &prompt, &s.tokens).unwrap();
                for (a, b) in scored.iter().zip(&s.logprobs) {
                    assert!((a - b).abs() < 1e-4, "score {a} vs sample {b}");
                }
            }
        }
    }
}

#[test]
fn top_k_and_top_p_never_leave_their_set() {
    let m = tiny(6);
    let prompt = encode(&m, "Q:4*4+1\n");
    let cases = [(3usize, 1.0f32), (0, 0.5), (5, 0.8)];
    for (top_k, top_p) in cases {
        let params = SamplingParams { n: 16, temperature: 1.3, top_k, top_p, max_new_tokens: 10, seed: 9, ..Default::default() };
        for s in &engine::generate(&m.model, std::slice::from_ref(&prompt), &params).unwrap()[0] {
            let ids: Vec<u32> = prompt.iter().chain(&s.tokens).copied().collect();
            let lp = logprobs_at(&m, &ids);
            for (j, &tok) in s.tokens.iter().enumerate() {
                // The allowed set, from the tempered distribution at this position.
                let row = (lp.get((prompt.len() + j - 1) as i64) / 1.3).softmax(-1, Kind::Float);
                let probs = Vec::<f32>::try_from(row).unwrap();
                let mut order: Vec<usize> = (0..probs.len()).collect();
                order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
                let k = if top_k == 0 { order.len() } else { top_k };
                let kept_mass: f32 = order[..k].iter().map(|&i| probs[i]).sum();
                let mut allowed = Vec::new();
                let mut before = 0.0f32;
                for &i in &order[..k] {
                    if before > top_p * kept_mass + 1e-6 {
                        break;
                    }
                    allowed.push(i as u32);
                    before += probs[i];
                }
                assert!(allowed.contains(&tok), "top_k={top_k} top_p={top_p}: token {tok} outside {allowed:?}");
                // Its logprob is that of the renormalised truncated distribution.
                let mass: f32 = allowed.iter().map(|&i| probs[i as usize]).sum();
                let want = (probs[tok as usize] / mass).ln();
                assert!((s.logprobs[j] - want).abs() < 1e-3, "logprob {} vs {want}", s.logprobs[j]);
            }
        }
    }
}

#[test]
fn generation_stops_on_eos_stop_strings_and_length() {
    let m = tiny(8);
    let prompt = encode(&m, "Q:2+2\n");
    let free = &engine::generate(&m.model, std::slice::from_ref(&prompt), &SamplingParams::greedy(24, vec![])).unwrap()[0][0];
    assert_eq!(free.finish, FinishReason::Length);
    assert_eq!(free.tokens.len(), 24);
    assert_eq!(free.logprobs.len(), 24);
    assert_eq!(free.token_ends.len(), 24);
    assert_eq!(*free.token_ends.last().unwrap() as usize, free.text.len());
    assert!(free.token_ends.windows(2).all(|w| w[0] <= w[1]));

    // The greedy path's third token as an eos id: generation ends there, the token kept.
    let eos = free.tokens[2];
    let first = free.tokens.iter().position(|&t| t == eos).unwrap();
    let s = &engine::generate(&m.model, std::slice::from_ref(&prompt), &SamplingParams::greedy(24, vec![eos])).unwrap()[0][0];
    assert_eq!(s.finish, FinishReason::Eos);
    assert_eq!(s.tokens, free.tokens[..=first]);

    // A stop string made of the greedy text's characters 3..5.
    let stop: String = free.text.chars().skip(3).take(2).collect();
    let params = SamplingParams { stop: vec![stop.clone()], ..SamplingParams::greedy(24, vec![]) };
    let s = &engine::generate(&m.model, std::slice::from_ref(&prompt), &params).unwrap()[0][0];
    assert_eq!(s.finish, FinishReason::Stop);
    assert!(s.text.ends_with(&stop), "{:?} should end with {stop:?}", s.text);
    assert_eq!(s.text.matches(&stop).count(), 1, "stops at the first occurrence");
    assert!(free.text.starts_with(&s.text));
}

#[test]
fn score_matches_the_forward_pass_and_checks_its_input() {
    let m = tiny(9);
    let prompt = encode(&m, "Q:1+1\n");
    let completion = encode(&m, "1+1=2\nA:2\n");
    let scored = engine::score(&m.model, &prompt, &completion).unwrap();
    let ids: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
    let lp = logprobs_at(&m, &ids);
    for (j, &tok) in completion.iter().enumerate() {
        let want = lp.double_value(&[(prompt.len() + j - 1) as i64, tok as i64]) as f32;
        assert!((scored[j] - want).abs() < 1e-5);
    }
    assert!(engine::score(&m.model, &[], &completion).is_err());
    let err = engine::score(&m.model, &prompt, &[999]).unwrap_err().to_string();
    assert!(err.contains("999"), "{err}");
}

#[test]
fn requests_over_the_context_length_are_refused() {
    let m = tiny(10);
    let max = m.model.config().max_position_embeddings;
    let prompt = vec![4u32; max - 5];
    let err = engine::generate(&m.model, &[prompt], &SamplingParams::greedy(10, vec![])).unwrap_err();
    assert!(matches!(err, prism_model::Error::ContextTooLong { .. }), "{err}");
}

#[test]
fn bf16_weights_give_float32_logits_close_to_f32() {
    let f32m = tiny(11);
    let bf16 = load("builtin:tiny-arith", &LoadOptions { seed: 11, dtype: prism_model::Dtype::Bf16, ..Default::default() }).unwrap();
    let x = Tensor::from_slice(&encode(&f32m, "Q:7+3*4-2\n").iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let a = tch::no_grad(|| f32m.model.forward(&x, None));
    let b = tch::no_grad(|| bf16.model.forward(&x, None));
    assert_eq!(b.kind(), Kind::Float);
    let diff = (a - b).abs().max().double_value(&[]);
    assert!(diff < 0.05, "bf16 vs f32 logits differ by {diff}");
}

/// A request its client abandoned stops at the next token: the other request
/// of the batch goes on to its length.
#[test]
fn a_cancelled_request_stops_and_the_rest_of_the_batch_goes_on() {
    let m = tiny(8);
    let prompt = encode(&m, "Q:2+2\n");
    let request = |max| engine::Request { prompt: prompt.clone(), params: SamplingParams::greedy(max, vec![]), top_logprobs: None };
    let requests = [request(40), request(40)];
    let tokens_of_first = std::cell::Cell::new(0usize);
    let out = engine::generate_requests(
        &m.model,
        &m.tokenizer,
        &requests,
        &mut |e| {
            if let engine::Event::Token { request: 0, tokens, .. } = e {
                tokens_of_first.set(tokens.len());
            }
        },
        &|request| request == 0 && tokens_of_first.get() >= 5,
    )
    .unwrap();
    assert_eq!(out[0][0].tokens.len(), 5, "cancelled after its fifth token");
    assert_eq!(out[0][0].finish, FinishReason::Length);
    assert_eq!(out[1][0].tokens.len(), 40);
    assert_eq!(out[0][0].tokens, out[1][0].tokens[..5], "what it had is what the other made");
}
