//! Result tables: the agent's CSV against the gold query's rows.

use std::collections::HashMap;

use super::Grade;
use super::value::as_number;

/// A parsed CSV: its header and rows, or why it does not parse.
fn parse(csv: &str) -> Result<(Vec<String>, Vec<Vec<String>>), String> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(csv.as_bytes());
    let header: Vec<String> =
        reader.headers().map_err(|e| e.to_string())?.iter().map(|h| h.trim().to_lowercase()).collect();
    let rows = reader
        .records()
        .map(|r| r.map(|r| r.iter().map(|v| v.trim().to_string()).collect()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<Vec<String>>, String>>()?;
    Ok((header, rows))
}

/// A cell as it is compared: numbers rounded to the tolerance's grid, text lower-cased.
fn key(cell: &str, tolerance: f64) -> String {
    match as_number(cell) {
        Some(x) if tolerance > 0.0 => format!("{:.0}", x / tolerance),
        Some(x) => format!("{x}"),
        None => cell.to_lowercase(),
    }
}

/// Rows as a multiset of keys.
fn multiset(rows: &[Vec<String>], tolerance: f64) -> HashMap<Vec<String>, usize> {
    let mut m = HashMap::new();
    for row in rows {
        *m.entry(row.iter().map(|c| key(c, tolerance)).collect()).or_default() += 1;
    }
    m
}

/// RECIPE section 8: every gold column is in `got` (by name, any order), and `got`'s rows
/// projected on them are the gold rows in any order, numbers within `tolerance` (absolute).
pub(super) fn grade(got: &str, gold: &str, tolerance: f64) -> Grade {
    let (gold_header, gold_rows) = match parse(gold) {
        Ok(t) => t,
        Err(e) => return Grade::fail(format!("the gold table does not parse: {e}")),
    };
    let (header, rows) = match parse(got) {
        Ok(t) => t,
        Err(e) => return Grade::fail(format!("the result CSV does not parse: {e}")),
    };
    let mut at = Vec::new();
    for column in &gold_header {
        match header.iter().position(|h| h == column) {
            Some(i) => at.push(i),
            None => return Grade::fail(format!("the result has no column `{column}`")),
        }
    }
    let projected: Vec<Vec<String>> = rows.iter().map(|r| at.iter().map(|&i| r[i].clone()).collect()).collect();
    if projected.len() != gold_rows.len() {
        return Grade::fail(format!("{} rows, expected {}", projected.len(), gold_rows.len()));
    }
    if near_equal(&projected, &gold_rows, tolerance) {
        Grade::pass(format!("{} rows of {} gold columns match", gold_rows.len(), gold_header.len()))
    } else {
        Grade::fail("the rows differ from the gold rows".to_string())
    }
}

/// Equal multisets of rows, numbers within `tolerance`: each gold row is matched to a distinct
/// row of `got` (greedily; rows are short and few in answers).
fn near_equal(got: &[Vec<String>], gold: &[Vec<String>], tolerance: f64) -> bool {
    let cell = |a: &str, b: &str| match (as_number(a), as_number(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= tolerance + 1e-12,
        _ => a.eq_ignore_ascii_case(b),
    };
    if multiset(got, tolerance) == multiset(gold, tolerance) {
        return true;
    }
    let mut used = vec![false; got.len()];
    gold.iter().all(|want| {
        let found = got
            .iter()
            .enumerate()
            .find(|(i, row)| !used[*i] && row.len() == want.len() && row.iter().zip(want).all(|(a, b)| cell(a, b)));
        found.map(|(i, _)| used[i] = true).is_some()
    })
}

/// BIRD's execution match: the same multiset of rows, whatever the column names (numbers as
/// numbers, so `3` and `3.0` agree).
pub fn execution_match(got: &str, gold: &str) -> bool {
    match (parse(got), parse(gold)) {
        (Ok((h1, r1)), Ok((h2, r2))) => h1.len() == h2.len() && multiset(&r1, 0.0) == multiset(&r2, 0.0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLD: &str = "name,total\nLyon,3.5\nParis,10\n";

    #[test]
    fn gold_columns_in_any_order_and_rows_in_any_order() {
        assert!(grade("total,name,extra\n10.004,paris,x\n3.5,Lyon,y\n", GOLD, 1e-2).correct);
        assert!(grade("Name,Total\nLyon,3.5\nParis,10\n", GOLD, 1e-2).correct, "names ignore case");
    }

    #[test]
    fn near_misses_fail() {
        assert_eq!(grade("name\nLyon\nParis\n", GOLD, 1e-2).reason, "the result has no column `total`");
        assert!(!grade("name,total\nLyon,3.52\nParis,10\n", GOLD, 1e-2).correct, "0.02 is over 1e-2");
        assert_eq!(grade("name,total\nLyon,3.5\n", GOLD, 1e-2).reason, "1 rows, expected 2");
        assert!(!grade("name,total\nLyon,3.5\nLyon,3.5\n", GOLD, 1e-2).correct, "a row twice is not two rows");
        assert!(!grade("name,total\nLyon,3.5\nRome,10\n", GOLD, 1e-2).correct);
        assert!(!grade("", GOLD, 1e-2).correct);
    }

    #[test]
    fn execution_match_is_a_multiset_of_rows() {
        assert!(execution_match("a,b\n10,Paris\n3.5,Lyon\n", "x,y\n3.5,Lyon\n10.0,Paris\n"));
        assert!(!execution_match("a\n3.5\n10\n", "x,y\n3.5,Lyon\n10,Paris\n"), "a column short");
        assert!(!execution_match("x,y\n3.5,Lyon\n", "x,y\n3.5,Lyon\n3.5,Lyon\n"));
    }
}
