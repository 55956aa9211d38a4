//! TableBench's answers: comma-separated parts, compared one by one as its published
//! evaluation does (`metrics/custom_em_metric.py`): exact match (EM) for fact checking,
//! numerical reasoning and impact analysis, EM with 10% error for correlation, forecasting and
//! statistical analysis.

use std::sync::LazyLock;

use regex::Regex;

use super::Grade;
use super::value::core;

static NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^-?\d+(\.\d+)?%?$").unwrap());

/// The answer's value parts: a `Final Answer:` prefix (TableBench's own format) dropped, split on
/// commas.
fn parts(text: &str) -> Vec<String> {
    let text = core(text);
    let text = match text.rfind("Final Answer:") {
        Some(at) => &text[at + "Final Answer:".len()..],
        None => text,
    };
    core(text).split(',').map(|p| p.trim().to_string()).collect()
}

/// A number part's value; percentages as fractions.
fn value(part: &str) -> Option<f64> {
    match part.strip_suffix('%') {
        Some(p) => p.parse::<f64>().ok().map(|x| x / 100.0),
        None => part.parse::<f64>().ok(),
    }
}

/// Decimal places of a number part.
fn decimals(part: &str) -> i32 {
    part.split_once('.').map(|(_, d)| d.len() as i32).unwrap_or(0)
}

/// One part: numbers rounded to `precision` decimals (percentages to 4, as fractions) or
/// within `tolerance` (relative) when there is one; text equal ignoring case.
fn same(got: &str, want: &str, precision: i32, tolerance: Option<f64>) -> bool {
    if !NUMBER.is_match(want) {
        return got.to_lowercase() == want.to_lowercase();
    }
    let (Some(w), Some(g)) = (value(want), Some(got).filter(|g| NUMBER.is_match(g)).and_then(value)) else {
        return false;
    };
    if want.ends_with('%') && !got.ends_with('%') {
        // A percentage may be answered as its number (69.75 for 69.75%) or as a fraction.
        return [g / 100.0, g].iter().any(|g| same_number(*g, w, 4, tolerance));
    }
    let digits = if want.ends_with('%') { 4 } else { precision };
    same_number(g, w, digits, tolerance)
}

/// Two numbers: within `tolerance` (relative) when there is one, else equal once rounded to
/// `digits` decimals.
fn same_number(g: f64, w: f64, digits: i32, tolerance: Option<f64>) -> bool {
    match tolerance {
        Some(t) if w == 0.0 => g == 0.0 && t >= 0.0,
        Some(t) => (g - w).abs() / w.abs() <= t + 1e-12,
        None => {
            let scale = 10f64.powi(digits);
            (g * scale).round() == (w * scale).round()
        }
    }
}

/// Correct when every part of `gold` matches the answer's part at the same place; the reason
/// gives the share of parts that match (TableBench's per-item score).
pub(super) fn grade(answer: &str, gold: &str, tolerance: Option<f64>) -> Grade {
    let (got, want) = (parts(answer), parts(gold));
    let precision =
        want.iter().filter(|p| NUMBER.is_match(p) && !p.ends_with('%')).map(|p| decimals(p)).min().unwrap_or(0);
    let matched = want.iter().zip(&got).filter(|(w, g)| same(g, w, precision, tolerance)).count();
    let rule = match tolerance {
        Some(t) => format!("EM within {}%", t * 100.0),
        None => "EM".to_string(),
    };
    let reason = format!("{matched} of {} parts match ({rule}): {:?} against {gold:?}", want.len(), got.join(", "));
    if matched == want.len() && got.len() == want.len() { Grade::pass(reason) } else { Grade::fail(reason) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_match_rounds_to_the_gold_precision() {
        assert!(grade("Final Answer: 1062", "1062", None).correct);
        assert!(grade("1062.4", "1062", None).correct, "rounded to the gold's 0 decimals");
        assert!(!grade("1063", "1062", None).correct);
        assert!(grade("Yes, 25.31", "yes, 25.3", None).correct);
        assert!(!grade("Yes, 25.36", "Yes, 25.3", None).correct, "25.4 is a near miss");
        assert!(grade("12.5%", "12.50%", None).correct);
        assert!(grade("69.75", "69.75%", None).correct, "a percentage answered as its number");
        assert!(grade("0.6975", "69.75%", None).correct, "or as a fraction");
        assert!(!grade("69.7", "69.75%", None).correct);
        assert!(!grade("Yes", "Yes, 25.3", None).correct, "a part missing");
        assert!(!grade("Yes, 25.3, 7", "Yes, 25.3", None).correct, "a part too many");
        assert!(!grade("Positive impact on sales", "Positive impact", None).correct);
    }

    #[test]
    fn ten_percent_error_for_analysis() {
        assert!(grade("Strong positive correlation, 0.93", "Strong positive correlation, 0.96", Some(0.10)).correct);
        assert!(!grade("Strong positive correlation, 0.80", "Strong positive correlation, 0.96", Some(0.10)).correct);
        assert!(!grade("Weak positive correlation, 0.96", "Strong positive correlation, 0.96", Some(0.10)).correct);
        assert!(grade("0", "0", Some(0.10)).correct);
        assert!(!grade("0.01", "0", Some(0.10)).correct);
        assert!(!grade("n/a", "0.5", Some(0.10)).correct);
    }
}
