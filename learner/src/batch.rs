//! From token sequences to the padded tensors of one forward pass.

use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// One sequence to score: a prompt, its completion, and per-completion-token data.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// Behaviour log-probs (RL) — empty for SFT.
    pub old_logprobs: Vec<f32>,
    /// Token advantages (RL) — empty for SFT.
    pub advantages: Vec<f32>,
    /// The learner's own log-probs at the start of the step (truncated IS).
    pub prox_logprobs: Option<Vec<f32>>,
    /// The reference model's log-probs (KL penalty).
    pub ref_logprobs: Option<Vec<f32>>,
}

/// The tensors of one micro-batch.
///
/// Rows are right-padded: every pad comes after every real token of its row, so
/// plain causal attention gives the real tokens exactly what a mask would, and
/// the learner calls the model without one (keeping the fused causal attention
/// kernels, flash attention on CUDA). `attention_mask` is there for policies
/// that want it.
///
/// Logits at position `p` predict the token at `p + 1`. Only a window of
/// positions `[offset, offset + S)` covers completion tokens, so the loss slices
/// the logits to that window; the per-token tensors below are `[B, S]` and
/// aligned with it.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]` int64, right-padded with 0.
    pub input_ids: Tensor,
    /// `[B, T]` int64, 1 on real tokens.
    pub attention_mask: Tensor,
    /// First scored logit position.
    pub offset: i64,
    /// `[B, S]` int64: the token each scored position predicts.
    pub targets: Tensor,
    /// `[B, S]` float32: 1 where the predicted token is a completion token.
    pub mask: Tensor,
    /// `[B, S]` float32 (zeros where not given).
    pub old_logprobs: Tensor,
    pub advantages: Tensor,
    pub prox_logprobs: Option<Tensor>,
    pub ref_logprobs: Option<Tensor>,
}

impl Batch {
    /// Builds the micro-batch of `rows` on `device`.
    pub fn new(rows: &[&Row], device: Device) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::Batch("empty micro-batch".into()));
        }
        for (i, r) in rows.iter().enumerate() {
            if r.prompt.is_empty() {
                return Err(Error::Batch(format!(
                    "row {i}: empty prompt (the first completion token needs a context)"
                )));
            }
            if r.completion.is_empty() {
                return Err(Error::Batch(format!("row {i}: empty completion")));
            }
        }
        let b = rows.len();
        let t = rows.iter().map(|r| r.prompt.len() + r.completion.len()).max().unwrap_or(0);
        let start = rows.iter().map(|r| r.prompt.len() - 1).min().unwrap_or(0);
        let end = rows.iter().map(|r| r.prompt.len() + r.completion.len() - 1).max().unwrap_or(0);
        let s = end - start;

        let mut ids = vec![0i64; b * t];
        let mut attn = vec![0i64; b * t];
        let mut targets = vec![0i64; b * s];
        let mut mask = vec![0f32; b * s];
        let mut old = vec![0f32; b * s];
        let mut adv = vec![0f32; b * s];
        let mut prox = rows[0].prox_logprobs.as_ref().map(|_| vec![0f32; b * s]);
        let mut reference = rows[0].ref_logprobs.as_ref().map(|_| vec![0f32; b * s]);
        for (i, r) in rows.iter().enumerate() {
            let n = r.completion.len();
            for (j, &tok) in r.prompt.iter().chain(&r.completion).enumerate() {
                ids[i * t + j] = tok as i64;
                attn[i * t + j] = 1;
            }
            let check = |name: &str, len: usize| {
                if len == n {
                    Ok(())
                } else {
                    Err(Error::Batch(format!("row {i}: {len} {name} for {n} completion tokens")))
                }
            };
            let first = i * s + (r.prompt.len() - 1 - start);
            for (j, &tok) in r.completion.iter().enumerate() {
                targets[first + j] = tok as i64;
                mask[first + j] = 1.0;
            }
            if !r.old_logprobs.is_empty() || !r.advantages.is_empty() {
                check("behaviour logprobs", r.old_logprobs.len())?;
                check("advantages", r.advantages.len())?;
                old[first..first + n].copy_from_slice(&r.old_logprobs);
                adv[first..first + n].copy_from_slice(&r.advantages);
            }
            for (dst, src, name) in [
                (&mut prox, &r.prox_logprobs, "proximal logprobs"),
                (&mut reference, &r.ref_logprobs, "reference logprobs"),
            ] {
                match (dst.as_mut(), src) {
                    (Some(dst), Some(src)) => {
                        check(name, src.len())?;
                        dst[first..first + n].copy_from_slice(src);
                    }
                    (None, None) => {}
                    _ => return Err(Error::Batch(format!("row {i}: {name} given for some rows only"))),
                }
            }
        }
        let (b, t, s) = (b as i64, t as i64, s as i64);
        let f32s = |v: &[f32]| Tensor::from_slice(v).view([b, s]).to_device(device);
        Ok(Batch {
            input_ids: Tensor::from_slice(&ids).view([b, t]).to_device(device),
            attention_mask: Tensor::from_slice(&attn).view([b, t]).to_device(device),
            offset: start as i64,
            targets: Tensor::from_slice(&targets).view([b, s]).to_device(device),
            mask: f32s(&mask),
            old_logprobs: f32s(&old),
            advantages: f32s(&adv),
            prox_logprobs: prox.as_deref().map(f32s),
            ref_logprobs: reference.as_deref().map(f32s),
        })
    }

    /// Number of scored positions per row, `S`.
    pub fn window(&self) -> i64 {
        self.targets.size()[1]
    }

    /// Per-row log-probs `[B, S]` as vectors of the completion tokens only.
    pub fn unpad(&self, values: &Tensor) -> Result<Vec<Vec<f32>>> {
        let values = values.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let mask = self.mask.to_device(Device::Cpu);
        let (b, s) = (mask.size()[0] as usize, mask.size()[1] as usize);
        let v: Vec<f32> = Vec::<f32>::try_from(values.view([-1]))?;
        let m: Vec<f32> = Vec::<f32>::try_from(mask.view([-1]))?;
        Ok((0..b).map(|i| (0..s).filter(|&j| m[i * s + j] > 0.0).map(|j| v[i * s + j]).collect()).collect())
    }
}

/// A micro-batch's rows end to end in one sequence, without padding
/// (`learner.pack`): the model reads [`Packing::ids`] as separate sequences
/// of [`Packing::lens`] ([`prism_model::Tokens::Packed`]) and returns the
/// hidden states of the completion-predicting positions only,
/// [`Packing::select`]; their log-probs go back to the [`Batch`]'s `[B, S]`
/// layout ([`Packing::spread`]) for the loss, which is then the padded
/// path's.
#[derive(Debug)]
pub struct Packing {
    /// `[1, N]` int64, every row's prompt and completion, row after row.
    pub ids: Tensor,
    /// Each row's length, summing to `N`.
    pub lens: Vec<i64>,
    /// `[M]` int64: the positions of `ids` whose logits predict a completion
    /// token, row after row (`M` the completion tokens).
    pub select: Tensor,
    /// `[1, M]` int64: the token each selected position predicts.
    pub targets: Tensor,
    /// `[M]` int64: where each selected position sits in the batch's
    /// flattened `[B, S]`.
    place: Tensor,
    /// The batch's `(B, S)`.
    shape: (i64, i64),
    /// [`Packing::shared`]: the shared prompt's length (`lens` are then the
    /// completions').
    prompt: Option<i64>,
}

impl Packing {
    /// The packing of `rows`, laid out as `batch` (built from the same rows).
    pub fn new(rows: &[&Row], batch: &Batch, device: Device) -> Result<Self> {
        let (b, s) = (batch.targets.size()[0], batch.window());
        if rows.len() as i64 != b {
            return Err(Error::Batch(format!("{} rows packed for a batch of {b}", rows.len())));
        }
        let n: usize = rows.iter().map(|r| r.prompt.len() + r.completion.len()).sum();
        let m: usize = rows.iter().map(|r| r.completion.len()).sum();
        let (mut ids, mut lens) = (Vec::with_capacity(n), Vec::with_capacity(rows.len()));
        let (mut select, mut targets, mut place) = (Vec::with_capacity(m), Vec::with_capacity(m), Vec::with_capacity(m));
        for (i, r) in rows.iter().enumerate() {
            let at = ids.len() as i64;
            ids.extend(r.prompt.iter().chain(&r.completion).map(|&t| t as i64));
            lens.push((r.prompt.len() + r.completion.len()) as i64);
            // Position p predicts token p + 1: the completion's j-th token is
            // predicted at prompt_len - 1 + j, which sits at column
            // prompt_len - 1 + j - offset of the batch's window.
            let first = r.prompt.len() as i64 - 1;
            for (j, &tok) in r.completion.iter().enumerate() {
                select.push(at + first + j as i64);
                targets.push(tok as i64);
                place.push(i as i64 * s + first - batch.offset + j as i64);
            }
        }
        let m = m as i64;
        Ok(Packing {
            ids: Tensor::from_slice(&ids).view([1, n as i64]).to_device(device),
            lens,
            select: Tensor::from_slice(&select).to_device(device),
            targets: Tensor::from_slice(&targets).view([1, m]).to_device(device),
            place: Tensor::from_slice(&place).to_device(device),
            shape: (b, s),
            prompt: None,
        })
    }

    /// The packing of `rows` that all share their prompt: the prompt once,
    /// then every completion ([`prism_model::Tokens::Shared`]), laid out as
    /// `batch` (built from the same rows). Each completion's first token is
    /// predicted from the prompt's last position, the others from its own.
    pub fn shared(rows: &[&Row], batch: &Batch, device: Device) -> Result<Self> {
        let (b, s) = (batch.targets.size()[0], batch.window());
        let Some(first) = rows.first() else { return Err(Error::Batch("empty micro-batch".into())) };
        if rows.len() as i64 != b || rows.iter().any(|r| r.prompt != first.prompt) {
            return Err(Error::Batch("a shared packing needs the batch's rows, all with one prompt".into()));
        }
        let p = first.prompt.len() as i64;
        let mut ids: Vec<i64> = first.prompt.iter().map(|&t| t as i64).collect();
        let (mut lens, mut select, mut targets, mut place) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, r) in rows.iter().enumerate() {
            let at = ids.len() as i64;
            ids.extend(r.completion.iter().map(|&t| t as i64));
            lens.push(r.completion.len() as i64);
            for (j, &tok) in r.completion.iter().enumerate() {
                select.push(if j == 0 { p - 1 } else { at + j as i64 - 1 });
                targets.push(tok as i64);
                place.push(i as i64 * s + p - 1 - batch.offset + j as i64);
            }
        }
        let (n, m) = (ids.len() as i64, targets.len() as i64);
        Ok(Packing {
            ids: Tensor::from_slice(&ids).view([1, n]).to_device(device),
            lens,
            select: Tensor::from_slice(&select).to_device(device),
            targets: Tensor::from_slice(&targets).view([1, m]).to_device(device),
            place: Tensor::from_slice(&place).to_device(device),
            shape: (b, s),
            prompt: Some(p),
        })
    }

    /// [`Packing::shared`] when `one_prompt` (the rows share their prompt),
    /// else [`Packing::new`].
    pub fn of(rows: &[&Row], batch: &Batch, device: Device, one_prompt: bool) -> Result<Self> {
        if one_prompt { Self::shared(rows, batch, device) } else { Self::new(rows, batch, device) }
    }

    /// The model's input: these sequences, the selected positions read.
    pub fn tokens(&self) -> prism_model::Tokens<'_> {
        match self.prompt {
            Some(prompt) => prism_model::Tokens::Shared { ids: &self.ids, prompt, lens: &self.lens, select: &self.select },
            None => prism_model::Tokens::Packed { ids: &self.ids, lens: &self.lens, select: &self.select },
        }
    }

    /// Per-position values `[1, M]` of the selected positions in the batch's
    /// `[B, S]` layout, zeros elsewhere (where the batch's mask is 0).
    /// Differentiable in `values`.
    pub fn spread(&self, values: &Tensor) -> Tensor {
        let (b, s) = self.shape;
        let zeros = Tensor::zeros([b * s], (values.kind(), values.device()));
        zeros.index_put(&[Some(&self.place)], &values.reshape([-1]), false).view([b, s])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_align_targets_with_the_logits_that_predict_them() {
        let a = Row { prompt: vec![10, 11, 12], completion: vec![20, 21], ..Row::default() };
        let b = Row { prompt: vec![30], completion: vec![40, 41, 42], ..Row::default() };
        let batch = Batch::new(&[&a, &b], Device::Cpu).unwrap();
        // Scored logit positions: a predicts 20 from position 2, 21 from 3; b predicts
        // 40 from 0 .. 42 from 2. Window [0, 4).
        assert_eq!(batch.offset, 0);
        assert_eq!(batch.window(), 4);
        let targets: Vec<i64> = Vec::try_from(batch.targets.view([-1])).unwrap();
        assert_eq!(targets, vec![0, 0, 20, 21, 40, 41, 42, 0]);
        let mask: Vec<f32> = Vec::try_from(batch.mask.view([-1])).unwrap();
        assert_eq!(mask, vec![0., 0., 1., 1., 1., 1., 1., 0.]);
        let ids: Vec<i64> = Vec::try_from(batch.input_ids.view([-1])).unwrap();
        assert_eq!(ids, vec![10, 11, 12, 20, 21, 30, 40, 41, 42, 0]);
        let unpadded = batch.unpad(&(batch.targets.to_kind(Kind::Float))).unwrap();
        assert_eq!(unpadded, vec![vec![20.0, 21.0], vec![40.0, 41.0, 42.0]]);

        // Packed: a's 5 tokens then b's 4; a predicts from 2, 3; b from 5 + 0 .. 5 + 2.
        let packing = Packing::new(&[&a, &b], &batch, Device::Cpu).unwrap();
        let ids: Vec<i64> = Vec::try_from(packing.ids.view([-1])).unwrap();
        assert_eq!(ids, vec![10, 11, 12, 20, 21, 30, 40, 41, 42]);
        assert_eq!(packing.lens, vec![5, 4]);
        let select: Vec<i64> = Vec::try_from(&packing.select).unwrap();
        assert_eq!(select, vec![2, 3, 5, 6, 7]);
        let targets: Vec<i64> = Vec::try_from(packing.targets.view([-1])).unwrap();
        assert_eq!(targets, vec![20, 21, 40, 41, 42]);
        // Spread back, the packed targets are the batch's (zeros under the mask's zeros).
        let spread = packing.spread(&packing.targets.to_kind(Kind::Float));
        assert!(spread.equal(&batch.targets.to_kind(Kind::Float)));
    }
}
