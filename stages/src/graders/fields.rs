//! DA-Code's `compare_text`: named values given as a JSON object, each a list.

use serde_json::{Map, Value};

use super::Grade;
use super::value::{as_number, close, normalize};

/// The JSON object in `answer`: from its first `{` to its last `}`.
fn object(answer: &str) -> Option<Map<String, Value>> {
    let (start, end) = (answer.find('{')?, answer.rfind('}')?);
    let text = answer.get(start..=end)?;
    serde_json::from_str(text).ok().or_else(|| serde_json::from_str(&text.replace('\'', "\"")).ok())
}

/// A value as the list DA-Code compares.
fn list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    }
}

/// One value: numbers within 1e-2 (relative), text after normalisation.
fn same(got: &Value, want: &Value) -> bool {
    let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let (g, w) = (text(got), text(want));
    match (as_number(&g), as_number(&w)) {
        (Some(g), Some(w)) => close(g, w, 1e-2),
        (None, Some(_)) => false,
        _ => normalize(&g) == normalize(&w),
    }
}

/// Equal lists, in order or (with `ignore_order`) as multisets.
fn same_list(got: &[Value], want: &[Value], ignore_order: bool) -> bool {
    if got.len() != want.len() {
        return false;
    }
    if !ignore_order {
        return got.iter().zip(want).all(|(g, w)| same(g, w));
    }
    let mut used = vec![false; got.len()];
    want.iter().all(|w| match (0..got.len()).find(|&i| !used[i] && same(&got[i], w)) {
        Some(i) => {
            used[i] = true;
            true
        }
        None => false,
    })
}

/// Correct when every gold field is in the answer's JSON object (names compared after
/// normalisation; one gold field left unmatched is paired with one answer field left over, as
/// the benchmark's own labels have misspelt names) with the same values.
pub(super) fn grade(answer: &str, fields: &[(String, Vec<Value>)], ignore_order: bool) -> Grade {
    let Some(given) = object(answer) else { return Grade::fail("no JSON object in the answer") };
    let mut unused: Vec<&String> = given.keys().collect();
    let mut pairs: Vec<(&str, Option<&Value>)> = Vec::new();
    for (name, _) in fields {
        let at = unused.iter().position(|k| normalize(k) == normalize(name));
        pairs.push((name, at.map(|i| &given[unused.remove(i)])));
    }
    let missing: Vec<usize> = (0..pairs.len()).filter(|&i| pairs[i].1.is_none()).collect();
    if let ([i], [k]) = (missing.as_slice(), unused.as_slice()) {
        pairs[*i].1 = Some(&given[*k]);
    }
    for ((name, got), (_, want)) in pairs.iter().zip(fields) {
        match got {
            None => return Grade::fail(format!("no field `{name}` in the answer")),
            Some(got) if !same_list(&list(got), want, ignore_order) => {
                return Grade::fail(format!("`{name}` is {got}, expected {}", Value::Array(want.clone())));
            }
            Some(_) => {}
        }
    }
    Grade::pass(format!("{} fields match", fields.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gold() -> Vec<(String, Vec<Value>)> {
        vec![
            ("The most frequent experience level".into(), vec![json!("Senior-level")]),
            ("ratio".into(), vec![json!(0.4612850082372323)]),
        ]
    }

    #[test]
    fn every_field_with_its_values() {
        let right = r#"{"The most frequent experience level": ["Senior-level"], "ratio": [0.4613]}"#;
        assert!(grade(right, &gold(), false).correct);
        assert!(grade(&format!("Here it is:\n```json\n{right}\n```"), &gold(), false).correct);
        assert!(
            grade(r#"{"the most frequent experience level": "senior-level", "Ratio": 0.461}"#, &gold(), false).correct
        );
        assert!(
            !grade(r#"{"The most frequent experience level": ["Mid-level"], "ratio": [0.4613]}"#, &gold(), false)
                .correct
        );
        assert!(
            !grade(r#"{"The most frequent experience level": ["Senior-level"], "ratio": [0.47]}"#, &gold(), false)
                .correct,
            "2% off"
        );
        assert!(!grade(r#"{"ratio": [0.4613]}"#, &gold(), false).correct);
        assert!(!grade("Senior-level, 0.46", &gold(), false).correct);
    }

    #[test]
    fn a_misspelt_gold_name_pairs_with_the_one_left_over() {
        let gold = vec![
            ("highest country".into(), vec![json!("Uruguay")]),
            ("Agriculytural Land %".into(), vec![json!(82.6)]),
        ];
        assert!(grade(r#"{"highest country": ["Uruguay"], "Agricultural Land %": [82.6]}"#, &gold, false).correct);
    }

    #[test]
    fn order_counts_unless_ignored() {
        let gold = vec![("Top".into(), vec![json!("Niger"), json!("Chad")])];
        assert!(!grade(r#"{"Top": ["Chad", "Niger"]}"#, &gold, false).correct);
        assert!(grade(r#"{"Top": ["Chad", "Niger"]}"#, &gold, true).correct);
        assert!(!grade(r#"{"Top": ["Chad", "Chad"]}"#, &gold, true).correct);
    }
}
