//! Step segmentation: cutting a completion into the steps that are scored.
//!
//! Every step is a byte span of the completion with surrounding whitespace
//! trimmed off; blank pieces are not steps. [`Segmenter::steps`] adds each
//! step's token span (`Trajectory::token_span`), which the learner needs.

use crate::config::{Config, Segmentation};
use crate::{Error, Result};
use prism_core::{Step, Trajectory};
use regex::Regex;
use std::ops::Range;
use std::sync::LazyLock;

/// `Step 3:` (also `**Step 3:**`, `## Step 3.`, `step 3)`) at the start of a line.
static STEP_MARKER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?mi)^[ \t>*#_]*step[ \t]*\d+[ \t]*[:.)]").expect("valid regex"));
static BLANK_LINE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\n[ \t\r]*\n").expect("valid regex"));

/// Cuts completions into steps as configured.
#[derive(Debug, Clone)]
pub struct Segmenter {
    kind: Segmentation,
    separator: Option<Regex>,
}

impl Segmenter {
    /// A segmenter for `[reward]`'s `segmentation` and `step_regex`.
    pub fn new(cfg: &Config) -> Result<Self> {
        let separator = if cfg.segmentation == Segmentation::Regex {
            Some(Regex::new(&cfg.step_regex).map_err(|e| {
                Error::Config(prism_core::config::Invalid::new("reward.step_regex", &cfg.step_regex, e.to_string()))
            })?)
        } else {
            None
        };
        Ok(Self { kind: cfg.segmentation, separator })
    }

    /// The byte spans of the steps of `text`, a completion of a `task` prompt.
    pub fn spans(&self, task: &str, text: &str) -> Vec<Range<u32>> {
        let kind = match self.kind {
            Segmentation::Auto => auto_kind(task, text),
            k => k,
        };
        let pieces: Vec<Range<usize>> = match kind {
            Segmentation::Line => split_by(text, text.match_indices('\n').map(|(i, _)| i..i + 1)),
            Segmentation::BlankLine => split_by(text, BLANK_LINE.find_iter(text).map(|m| m.range())),
            Segmentation::StepMarker => {
                let starts: Vec<usize> = STEP_MARKER.find_iter(text).map(|m| m.start()).collect();
                let mut bounds = vec![0];
                bounds.extend(starts.iter().copied().filter(|&s| s > 0));
                bounds.push(text.len());
                bounds.windows(2).map(|w| w[0]..w[1]).collect()
            }
            Segmentation::Regex => match &self.separator {
                Some(re) => split_by(text, re.find_iter(text).map(|m| m.range())),
                None => split_by(text, std::iter::empty()),
            },
            Segmentation::Auto => unreachable!("resolved above"),
        };
        pieces.into_iter().filter_map(|r| trim(text, r)).map(|r| r.start as u32..r.end as u32).collect()
    }

    /// The steps of a trajectory's completion, with byte and token spans.
    pub fn steps(&self, t: &Trajectory) -> Vec<Step> {
        self.spans(&t.prompt.task, &t.text).into_iter().map(|text| Step { tokens: t.token_span(&text), text }).collect()
    }
}

fn auto_kind(task: &str, text: &str) -> Segmentation {
    match task {
        "arithmetic" | "gsm8k" => Segmentation::Line,
        _ if STEP_MARKER.find_iter(text).nth(1).is_some() => Segmentation::StepMarker,
        _ if BLANK_LINE.is_match(text.trim()) => Segmentation::BlankLine,
        _ => Segmentation::Line,
    }
}

/// The pieces of `text` between the separator ranges `seps` (in order).
fn split_by(text: &str, seps: impl Iterator<Item = Range<usize>>) -> Vec<Range<usize>> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for sep in seps {
        pieces.push(start..sep.start);
        start = sep.end;
    }
    pieces.push(start..text.len());
    pieces
}

/// `r` without leading and trailing whitespace; `None` when nothing is left.
fn trim(text: &str, r: Range<usize>) -> Option<Range<usize>> {
    let piece = &text[r.clone()];
    let start = r.start + (piece.len() - piece.trim_start().len());
    let end = r.end - (piece.len() - piece.trim_end().len());
    (start < end).then_some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(kind: Segmentation, step_regex: &str) -> Segmenter {
        Segmenter::new(&Config { segmentation: kind, step_regex: step_regex.into(), ..Config::default() }).unwrap()
    }

    fn pieces<'a>(s: &Segmenter, task: &str, text: &'a str) -> Vec<&'a str> {
        s.spans(task, text).into_iter().map(|r| &text[r.start as usize..r.end as usize]).collect()
    }

    #[test]
    fn lines_skip_blank_ones_and_trim() {
        let text = "3*4=12\n\n 7+12=19 \nA:19\n";
        assert_eq!(pieces(&seg(Segmentation::Line, ""), "x", text), ["3*4=12", "7+12=19", "A:19"]);
        assert_eq!(seg(Segmentation::Line, "").spans("x", text), vec![0..6, 9..16, 18..22]);
    }

    #[test]
    fn blank_lines_keep_paragraphs_whole() {
        let text = "First, add.\nStill first.\n\n  \nSecond.\r\n\r\nThird";
        assert_eq!(
            pieces(&seg(Segmentation::BlankLine, ""), "x", text),
            ["First, add.\nStill first.", "Second.", "Third"]
        );
    }

    #[test]
    fn step_markers_start_steps() {
        let text = "Let me think.\nStep 1: add 2 and 3.\nso 5\n**Step 2:** double it: 10\nstep 3) done";
        assert_eq!(
            pieces(&seg(Segmentation::StepMarker, ""), "x", text),
            ["Let me think.", "Step 1: add 2 and 3.\nso 5", "**Step 2:** double it: 10", "step 3) done"]
        );
    }

    #[test]
    fn regex_separators() {
        let s = seg(Segmentation::Regex, r";\s*");
        assert_eq!(pieces(&s, "x", "a=1; b=2;c=3;"), ["a=1", "b=2", "c=3"]);
    }

    #[test]
    fn auto_picks_by_task_and_text() {
        let s = seg(Segmentation::Auto, "");
        assert_eq!(pieces(&s, "arithmetic", "1+2=3\nA:3"), ["1+2=3", "A:3"]);
        assert_eq!(pieces(&s, "math", "Step 1: a\nb\nStep 2: c"), ["Step 1: a\nb", "Step 2: c"]);
        assert_eq!(pieces(&s, "math", "a\nb\n\nc"), ["a\nb", "c"]);
    }

    #[test]
    fn steps_carry_token_spans() {
        use prism_core::*;
        let text = "3*4=12\n7+12=19\nA:19\n";
        let t = Trajectory {
            id: TrajectoryId(0),
            group: GroupId(0),
            sample: 0,
            group_size: 1,
            prompt: Prompt {
                id: PromptId(0),
                task: "arithmetic".into(),
                problem: "7+3*4".into(),
                text: "Q:7+3*4\n".into(),
                reference: None,
            },
            policy_version: PolicyVersion(0),
            prompt_tokens: vec![],
            // tokens: "3*4" "=12\n" "7+" "12=19" "\nA:" "19" "\n"
            tokens: vec![0; 7],
            logprobs: vec![0.0; 7],
            text: text.into(),
            token_ends: vec![3, 7, 9, 14, 17, 19, 20],
            finish: FinishReason::Eos,
            generate_ms: 0,
            version_changes: Vec::new(),
        };
        let steps = seg(Segmentation::Line, "").steps(&t);
        assert_eq!(steps.len(), 3);
        assert_eq!((steps[0].text.clone(), steps[0].tokens.clone()), (0..6, 0..2));
        assert_eq!((steps[1].text.clone(), steps[1].tokens.clone()), (7..14, 2..4));
        // "A:19" starts inside the token "\nA:", which therefore belongs to it.
        assert_eq!((steps[2].text.clone(), steps[2].tokens.clone()), (15..19, 4..6));
    }
}
