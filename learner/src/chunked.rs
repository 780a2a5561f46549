//! The loss over the vocabulary a few positions at a time
//! (`learner.logit_chunk`), so that a micro-batch's vocabulary-sized
//! tensors (logits, their log-softmax, its gradient, the entropy's
//! temporaries: about four copies of tokens × vocabulary float32 values)
//! are those of one chunk of positions, not of every trained token (152k
//! values a token for Qwen's vocabulary). The same loss and gradients as
//! the whole window at once, up to the order of float sums (tested).
//!
//! The loss depends on the vocabulary only through each position's
//! log-probability of its target and its entropy, so:
//!
//! 1. without a graph, chunk by chunk: the head's logits, the targets'
//!    log-probs and the entropies, `[B, S]`;
//! 2. the loss of those (as leaves), backpropagated: its gradient per
//!    position, `[B, S]`;
//! 3. chunk by chunk again, with a graph from the hidden states (a leaf):
//!    the head, log-probs and entropies, backpropagated with the gradients
//!    of step 2, into the head's parameters and the hidden states' gradient;
//! 4. a surrogate, `sum(hidden · that gradient)`, whose backward pass
//!    carries it through the layers.
//!
//! The head runs twice (the price of the memory, like recomputing
//! activations; a small share of a step where the layers dominate).

use crate::Result;
use crate::loss::{Sums, entropy, token_logprobs};
use tch::{Kind, Tensor};

/// The loss of a micro-batch whose logits are `head(hidden)`: `hidden` the
/// window's hidden states `[B, S, ..]` with their graph, `targets` `[B, S]`,
/// at most `chunk` positions at a time. `loss_of(logp, entropy)` is the loss
/// from the targets' log-probs (at `temperature`) and the positions'
/// entropies, `[B, S]` each; `entropy_grad` when it is differentiated in the
/// entropy too. The head and log-probs run inside `scope` (the autocast
/// span), the backward passes outside it. Returns the surrogate to
/// backpropagate (the head's parameters have their gradients already) and
/// the loss's sums.
#[allow(clippy::too_many_arguments)]
pub fn loss(
    hidden: &Tensor,
    head: &dyn Fn(&Tensor) -> Result<Tensor>,
    scope: &dyn Fn(&mut dyn FnMut()),
    targets: &Tensor,
    temperature: f64,
    chunk: i64,
    entropy_grad: bool,
    loss_of: &mut dyn FnMut(&Tensor, &Tensor) -> Result<(Tensor, Sums)>,
) -> Result<(Tensor, Sums)> {
    let len = hidden.size()[1];
    let chunk = chunk.clamp(1, len.max(1));
    let spans: Vec<(i64, i64)> = (0..len).step_by(chunk as usize).map(|a| (a, chunk.min(len - a))).collect();
    // The head, the targets' log-probs and the entropies of positions a..a+n, in the scope.
    let chunk_of = |x: &Tensor, a: i64, n: i64, with_entropy: bool| -> Result<(Tensor, Option<Tensor>)> {
        let mut out = None;
        scope(&mut || {
            out = Some(head(&x.narrow(1, a, n)).map(|logits| {
                let (taken, log_probs) = token_logprobs(&logits, &targets.narrow(1, a, n), temperature);
                (taken, with_entropy.then(|| entropy(&log_probs)))
            }))
        });
        out.ok_or_else(|| crate::Error::Model("the scope did not run the head".into()))?
    };
    let leaf = hidden.detach();
    let (logp, ent) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
        let (mut logp, mut ent) = (Vec::with_capacity(spans.len()), Vec::with_capacity(spans.len()));
        for &(a, n) in &spans {
            let (taken, h) = chunk_of(&leaf, a, n, true)?;
            logp.push(taken);
            ent.extend(h);
        }
        Ok((Tensor::cat(&logp, 1), Tensor::cat(&ent, 1)))
    })?;
    let logp = logp.set_requires_grad(true);
    let ent = ent.set_requires_grad(entropy_grad);
    let (loss, sums) = loss_of(&logp, &ent)?;
    loss.f_backward()?;
    let or_zeros = |g: Tensor| if g.defined() { g } else { logp.zeros_like() };
    let d_logp = or_zeros(logp.grad());
    let d_ent = entropy_grad.then(|| or_zeros(ent.grad()));
    let leaf = leaf.set_requires_grad(true);
    for &(a, n) in &spans {
        let (taken, h) = chunk_of(&leaf, a, n, d_ent.is_some())?;
        let mut s = (taken * d_logp.narrow(1, a, n)).sum(Kind::Float);
        if let (Some(h), Some(d)) = (h, &d_ent) {
            s = s + (h * d.narrow(1, a, n)).sum(Kind::Float);
        }
        s.f_backward()?;
    }
    let d_hidden = leaf.grad();
    let surrogate = if d_hidden.defined() { (hidden * d_hidden.detach()).sum(Kind::Float) } else { hidden.sum(Kind::Float) * 0.0 };
    Ok((surrogate, sums))
}
