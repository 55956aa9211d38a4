//! `format_filter`: strict format compliance of whole trajectories (RECIPE section 6). A
//! trajectory passes only if it converts losslessly into the training format: system, then
//! the user's question, then assistant turns each of `<think>…</think>` followed by one
//! `<code>` block (answered by exactly one `<interpreter>` user turn) or by the final
//! `<answer>`, which ends the conversation; no nested or stray protocol tags anywhere in a turn.
//!
//! ```toml
//! [stages.well_formed]
//! kind = "format_filter"
//! inputs = ["trajectories"]
//! ```

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use kiln_pipeline::Result;
use kiln_pipeline::stage::{CheckCx, Input, InputSchema, Output, Plain, Problem, Stage, StageCx};
use serde::{Deserialize, Serialize};

use kiln_llm::Message;

use super::{Refusal, filter_schema, retain};
use crate::agent::protocol::{Action, parse_action};

/// Parameters of a `format_filter` stage (none).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatFilter {}

const KIND: &str = "format_filter";
const TAGS: [&str; 4] = ["think", "code", "answer", "interpreter"];

/// Checks one assistant turn: the protocol shape, and each tag exactly where it belongs.
fn check_turn(turn: &str) -> Result<Action, String> {
    let action = parse_action(turn);
    if let Action::Invalid(why) = action {
        return Err(why);
    }
    let expected = |tag: &str| match (tag, &action) {
        ("think", _) => 1,
        ("code", Action::Code(_)) | ("answer", Action::Answer(_)) => 1,
        _ => 0,
    };
    for tag in TAGS {
        let (open, close) = (turn.matches(&format!("<{tag}>")).count(), turn.matches(&format!("</{tag}>")).count());
        if open != expected(tag) || close != expected(tag) {
            return Err(format!("<{tag}> appears {open} times and </{tag}> {close} times (nested or stray tags)"));
        }
    }
    Ok(action)
}

/// The whole conversation: roles in order, every code turn answered, one final answer last.
/// `end_reason` (how the run ended) explains a missing answer.
pub fn check_trajectory(messages: &[Message], end_reason: Option<&str>) -> Result<(), Refusal> {
    let m: Vec<(&str, &str)> = messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
    let bad = |rule: &str, detail: String| Err((rule.to_string(), detail));
    if m.len() < 3 || m[0].0 != "system" || m[1].0 != "user" {
        return bad("roles", "a trajectory starts with a system and a user message".into());
    }
    if TAGS.iter().any(|t| m[1].1.contains(&format!("<{t}>"))) {
        return bad("tags_in_question", "the question holds protocol tags".into());
    }
    let mut answered = false;
    for (i, (role, content)) in m.iter().enumerate().skip(2) {
        let turn = (i - 2) / 2 + 1;
        if answered {
            return bad("after_answer", format!("message {} follows the final answer", i + 1));
        }
        if (i - 2) % 2 == 0 {
            if *role != "assistant" {
                return bad("roles", format!("message {} should be the assistant's, is {role}", i + 1));
            }
            match check_turn(content) {
                Ok(Action::Answer(_)) => answered = true,
                Ok(_) => {}
                Err(why) => return bad("turn", format!("turn {turn}: {why}")),
            }
        } else {
            let wrapped = content.starts_with("<interpreter>\n") && content.ends_with("\n</interpreter>");
            if *role != "user" || !wrapped || content.matches("<interpreter>").count() != 1 {
                return bad("observation", format!("message {} should be one <interpreter> observation", i + 1));
            }
        }
    }
    if !answered {
        let why = match end_reason.unwrap_or("") {
            "" => "the trajectory has no final answer".to_string(),
            reason => format!("the trajectory has no final answer (it ended: {reason})"),
        };
        return bad("no_answer", why);
    }
    Ok(())
}

impl Plain for FormatFilter {}

#[async_trait]
impl Stage for FormatFilter {
    async fn output_schema(&self, _cx: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
        filter_schema(KIND, inputs, &["messages", "end_reason"])
    }

    async fn run(&self, cx: &StageCx, inputs: &[Input]) -> Result<Output> {
        retain(cx, KIND, &inputs[0], |t| check_trajectory(&t.messages, t.end_reason.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(turns: &[(&str, &str)]) -> Result<(), Refusal> {
        let mut messages = vec![Message::new("system", "s"), Message::new("user", "q")];
        messages.extend(turns.iter().map(|(r, c)| Message::new(r, *c)));
        check_trajectory(&messages, Some("answer"))
    }

    const CODE: &str = "<think>look</think>\n<code>\n```python\nprint(1)\n```\n</code>";
    const OBS: &str = "<interpreter>\n1\n</interpreter>";

    #[test]
    fn good_trajectories_pass() {
        assert_eq!(
            check(&[("assistant", CODE), ("user", OBS), ("assistant", "<think>ok</think>\n<answer>1</answer>")]),
            Ok(())
        );
    }

    #[test]
    fn edge_cases_are_refused_with_their_rule() {
        let rule = |turns: &[(&str, &str)]| check(turns).unwrap_err();
        let answer = ("assistant", "<think>ok</think>\n<answer>1</answer>");
        // Nested tags inside think; an unclosed tag; an answer split over two turns.
        assert_eq!(rule(&[("assistant", "<think>a <think>b</think></think><answer>1</answer>"),]).0, "turn");
        assert_eq!(rule(&[("assistant", "<think>a</think><answer>1")]).0, "turn");
        let split = rule(&[
            ("assistant", "<think>a</think><answer>the total is</answer>"),
            ("assistant", "<think>b</think><answer>42</answer>"),
        ]);
        assert_eq!(split.0, "after_answer");
        // A code turn with no observation, an observation not wrapped, no answer at all.
        assert_eq!(rule(&[("assistant", CODE), answer]).0, "observation");
        assert_eq!(rule(&[("assistant", CODE), ("user", "1"), answer]).0, "observation");
        assert_eq!(rule(&[("assistant", CODE), ("user", OBS)]).0, "no_answer");
        // An answer hidden in a code turn, and an interpreter tag written by the model.
        assert_eq!(
            rule(&[("assistant", "<think>a</think><code>\n```python\nx\n```\n</code><answer>2</answer>")]).0,
            "turn"
        );
        assert_eq!(rule(&[("assistant", "<think>a <interpreter>x</interpreter></think><answer>1</answer>")]).0, "turn");
    }
}
