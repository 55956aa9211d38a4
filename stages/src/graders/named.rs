//! InfiAgent-DABench's closed-form answers: `@name[value]` for every name of the label.

use std::sync::LazyLock;

use regex::Regex;

use super::Grade;
use super::value::{as_number, core, normalize};

static NAMED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"@([A-Za-z_][A-Za-z0-9_]*)\[([^\]]*)\]").unwrap());

/// Every `@name[value]` of `answer`, in order.
pub fn parse_named(answer: &str) -> Vec<(String, String)> {
    NAMED.captures_iter(answer).map(|c| (c[1].to_string(), c[2].trim().to_string())).collect()
}

/// Decimal places `value` is written with (`42.67` has 2).
fn decimals(value: &str) -> usize {
    core(value).trim_end_matches('%').split_once('.').map(|(_, d)| d.len()).unwrap_or(0)
}

/// One named value: a number equal to the label once rounded to the label's decimals, or text
/// equal ignoring case and spacing.
fn same(got: &str, want: &str) -> bool {
    match (as_number(want), as_number(got)) {
        (Some(w), Some(g)) => {
            let scale = 10f64.powi(decimals(want) as i32);
            (g * scale).round() == (w * scale).round()
        }
        (Some(_), None) => false,
        _ => normalize(got) == normalize(want) && !normalize(want).is_empty(),
    }
}

/// Correct when every name of `label` is in `answer` with a value that matches (the last one,
/// if a name is given twice).
pub(super) fn grade(answer: &str, label: &[(String, String)]) -> Grade {
    let given = parse_named(answer);
    if given.is_empty() {
        return Grade::fail("no @name[value] in the answer");
    }
    for (name, want) in label {
        match given.iter().rev().find(|(n, _)| n == name) {
            None => return Grade::fail(format!("@{name} is missing")),
            Some((_, got)) if !same(got, want) => return Grade::fail(format!("@{name}[{got}] is not [{want}]")),
            Some(_) => {}
        }
    }
    Grade::pass(format!("all {} named values match", label.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_name_must_match() {
        let l = label(&[("male_mean", "29.71"), ("female_mean", "28.84"), ("males_longer", "yes")]);
        assert!(grade("@male_mean[29.71] @female_mean[28.84] @males_longer[yes]", &l).correct);
        assert!(grade("@male_mean[29.7149] @female_mean[ 28.836 ] @males_longer[ Yes ]", &l).correct, "rounded");
        let near = grade("@male_mean[29.72] @female_mean[28.84] @males_longer[yes]", &l);
        assert_eq!((near.correct, near.reason.as_str()), (false, "@male_mean[29.72] is not [29.71]"));
        assert_eq!(grade("@male_mean[29.71] @female_mean[28.84]", &l).reason, "@males_longer is missing");
        assert!(!grade("@male_mean[29.71] @female_mean[28.84] @males_longer[no]", &l).correct);
        assert!(!grade("male_mean = 29.71", &l).correct);
    }

    #[test]
    fn integers_and_codes() {
        let l = label(&[("records_1990", "1311"), ("top_species", "DM")]);
        assert!(grade("@records_1990[1311] @top_species[dm]", &l).correct);
        assert!(grade("@records_1990[1311.4] @top_species[DM]", &l).correct, "rounded to the label's 0 decimals");
        assert!(!grade("@records_1990[1311.6] @top_species[DM]", &l).correct);
        assert!(!grade("@records_1990[1,312] @top_species[DM]", &l).correct);
        assert_eq!(parse_named("x @a[1] y @b_2[two words]"), label(&[("a", "1"), ("b_2", "two words")]));
    }
}
