//! Question drafts per category: a question about a table's real columns, the DataFusion SQL
//! that answers it, an optional check that the answer is unambiguous, and the slots used (so a
//! test can recompute the answer independently).

use serde_json::json;

use crate::profile::stats::ColumnProfile;

/// Categories this generator can instantiate, by taxonomy id.
pub const SUPPORTED: &[&str] = &[
    "aggregation",
    "anomaly_detection",
    "arithmetic_calculation",
    "comparison",
    "comprehensive_data_preprocessing",
    "correlation_analysis",
    "counting",
    "descriptive_analysis",
    "distribution_analysis",
    "fact_checking",
    "feature_engineering",
    "multi_hop_numerical_reasoning",
    "ranking",
    "statistical_analysis",
    "time_based_calculation",
];

/// A question with the SQL that computes its gold answer.
#[derive(Debug, Clone)]
pub struct Draft {
    /// The question, in English.
    pub question: String,
    /// One query returning one row; its first column is the answer.
    pub sql: String,
    /// A query returning one boolean: true when the answer is unambiguous (no tie).
    pub check: Option<String>,
    /// The slots filled in, for independent recomputation.
    pub params: serde_json::Value,
}

/// A table as the generator sees it: its SQL name and its columns by role.
#[derive(Debug)]
pub struct Columns<'a> {
    /// Table name in the SQL.
    pub table: &'a str,
    /// Numeric columns that are measurements, not identifiers.
    pub numeric: Vec<&'a ColumnProfile>,
    /// Text columns with 2 to 30 distinct values.
    pub categorical: Vec<&'a ColumnProfile>,
    /// Date or timestamp columns.
    pub dates: Vec<&'a ColumnProfile>,
    /// Every column.
    pub all: Vec<&'a ColumnProfile>,
}

impl<'a> Columns<'a> {
    /// Sorts `columns` into roles.
    pub fn new(table: &'a str, columns: &'a [ColumnProfile]) -> Self {
        let is_id = |c: &ColumnProfile| {
            let n = c.name.to_lowercase();
            n == "id" || n.ends_with("_id") || n.ends_with(" id") || n.ends_with("id") && n.len() <= 4
        };
        let has_values = |c: &&ColumnProfile| c.min.is_some() && c.unique_count != Some(1);
        let numeric = columns
            .iter()
            .filter(|c| matches!(c.data_type.as_str(), "Int64" | "Int32" | "Float64" | "Float32" | "UInt64"))
            .filter(|c| !is_id(c))
            .filter(has_values)
            .collect();
        let categorical = columns
            .iter()
            .filter(|c| c.data_type == "Utf8" && c.unique_count.is_some_and(|n| (2..=30).contains(&n)))
            .filter(|c| !c.unique_values.is_empty())
            .collect();
        let dates = columns
            .iter()
            .filter(|c| c.data_type.starts_with("Date") || c.data_type.starts_with("Timestamp"))
            .filter(has_values)
            .collect();
        Columns { table, numeric, categorical, dates, all: columns.iter().collect() }
    }
}

/// Deterministic choices, seeded per table and category.
#[derive(Debug)]
pub struct Picker(u64);

impl Picker {
    /// A picker seeded by `parts`.
    pub fn new(parts: &[&str]) -> Self {
        let h = blake3::hash(parts.join("\0").as_bytes());
        Picker(u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default()))
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// One of `items`.
    pub fn pick<'b, T>(&mut self, items: &'b [T]) -> Option<&'b T> {
        if items.is_empty() { None } else { items.get((self.next() % items.len() as u64) as usize) }
    }

    /// Two different items of `items`.
    pub fn pick_two<'b, T>(&mut self, items: &'b [T]) -> Option<(&'b T, &'b T)> {
        if items.len() < 2 {
            return None;
        }
        let a = (self.next() % items.len() as u64) as usize;
        let b = (a + 1 + (self.next() % (items.len() as u64 - 1)) as usize) % items.len();
        Some((&items[a], &items[b]))
    }
}

/// A quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A quoted SQL string literal.
fn lit(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Drafts one question of `category` about `cols`, or `None` when the table lacks the columns
/// the category needs.
pub fn draft(category: &str, cols: &Columns<'_>, p: &mut Picker) -> Option<Draft> {
    let t = ident(cols.table);
    let tn = cols.table;
    let d = |question: String, sql: String, check: Option<String>, params: serde_json::Value| {
        Some(Draft { question, sql, check, params })
    };
    match category {
        "aggregation" => {
            let n = p.pick(&cols.numeric)?;
            let (word, func) = *p.pick(&[("average", "AVG"), ("total", "SUM")])?;
            d(
                format!("What is the {word} of `{}` over all rows of the `{tn}` table?", n.name),
                format!("SELECT {func}({}) FROM {t}", ident(&n.name)),
                None,
                json!({"op": word, "column": n.name}),
            )
        }
        "ranking" => {
            let (c, n) = (p.pick(&cols.categorical)?, p.pick(&cols.numeric)?);
            let (cq, nq) = (ident(&c.name), ident(&n.name));
            let groups = format!(
                "SELECT {cq} AS g, AVG({nq}) AS v FROM {t} WHERE {cq} IS NOT NULL AND {nq} IS NOT NULL GROUP BY {cq}"
            );
            d(
                format!("In the `{tn}` table, which value of `{}` has the highest average `{}`?", c.name, n.name),
                format!("SELECT g FROM ({groups}) ORDER BY v DESC LIMIT 1"),
                Some(format!("SELECT COUNT(*) = 1 FROM ({groups}) WHERE v = (SELECT MAX(v) FROM ({groups}))")),
                json!({"group": c.name, "column": n.name}),
            )
        }
        "counting" => {
            let c = p.pick(&cols.categorical)?;
            let v = p.pick(&c.unique_values)?;
            d(
                format!("How many rows of the `{tn}` table have `{}` equal to \"{v}\"?", c.name),
                format!("SELECT COUNT(*) FROM {t} WHERE {} = {}", ident(&c.name), lit(v)),
                None,
                json!({"column": c.name, "value": v}),
            )
        }
        "comparison" => {
            let (c, n) = (p.pick(&cols.categorical)?, p.pick(&cols.numeric)?);
            let (a, b) = p.pick_two(&c.unique_values)?;
            let avg =
                |v: &str| format!("(SELECT AVG({}) FROM {t} WHERE {} = {})", ident(&n.name), ident(&c.name), lit(v));
            d(
                format!(
                    "In the `{tn}` table, is the average `{}` higher for rows where `{}` is \"{a}\" than for rows where it is \"{b}\"? Answer Yes or No.",
                    n.name, c.name
                ),
                format!("SELECT CASE WHEN {} > {} THEN 'Yes' ELSE 'No' END", avg(a), avg(b)),
                Some(format!("SELECT {} IS NOT NULL AND {} IS NOT NULL AND {} <> {}", avg(a), avg(b), avg(a), avg(b))),
                json!({"group": c.name, "column": n.name, "a": a, "b": b}),
            )
        }
        "statistical_analysis" => {
            let n = p.pick(&cols.numeric)?;
            let (word, func) = *p.pick(&[("sample standard deviation", "STDDEV"), ("median", "MEDIAN")])?;
            d(
                format!("What is the {word} of `{}` in the `{tn}` table?", n.name),
                format!("SELECT {func}({}) FROM {t}", ident(&n.name)),
                None,
                json!({"op": word, "column": n.name}),
            )
        }
        "correlation_analysis" => {
            let (a, b) = p.pick_two(&cols.numeric)?;
            let (aq, bq) = (ident(&a.name), ident(&b.name));
            d(
                format!(
                    "What is the Pearson correlation coefficient between `{}` and `{}` in the `{tn}` table (rows where both are present)?",
                    a.name, b.name
                ),
                format!(
                    "SELECT CORR(CAST({aq} AS DOUBLE), CAST({bq} AS DOUBLE)) FROM {t} WHERE {aq} IS NOT NULL AND {bq} IS NOT NULL"
                ),
                None,
                json!({"a": a.name, "b": b.name}),
            )
        }
        "arithmetic_calculation" => {
            let n = p.pick(&cols.numeric)?;
            let q = ident(&n.name);
            d(
                format!(
                    "What is the difference between the largest and the smallest `{}` in the `{tn}` table?",
                    n.name
                ),
                format!("SELECT MAX({q}) - MIN({q}) FROM {t}"),
                None,
                json!({"column": n.name}),
            )
        }
        "descriptive_analysis" => {
            let c = p.pick(&cols.all)?;
            d(
                format!("How many distinct non-missing values does `{}` take in the `{tn}` table?", c.name),
                format!("SELECT COUNT(DISTINCT {}) FROM {t}", ident(&c.name)),
                None,
                json!({"column": c.name}),
            )
        }
        "anomaly_detection" => {
            let n = p.pick(&cols.numeric)?;
            let q = ident(&n.name);
            d(
                format!(
                    "In the `{tn}` table, how many rows have a `{}` more than 2 sample standard deviations away from its mean?",
                    n.name
                ),
                format!(
                    "SELECT COUNT(*) FROM {t}, (SELECT AVG({q}) AS m, STDDEV({q}) AS s FROM {t}) AS stats WHERE ABS({q} - m) > 2 * s"
                ),
                None,
                json!({"column": n.name, "k": 2}),
            )
        }
        "distribution_analysis" => {
            let n = p.pick(&cols.numeric)?;
            let q = ident(&n.name);
            d(
                format!(
                    "What is the skewness (population Fisher-Pearson coefficient) of `{}` in the `{tn}` table, ignoring missing values?",
                    n.name
                ),
                format!(
                    "SELECT AVG(POWER(({q} - m) / s, 3)) FROM {t}, (SELECT AVG({q}) AS m, STDDEV_POP({q}) AS s FROM {t}) AS stats WHERE {q} IS NOT NULL"
                ),
                Some(format!("SELECT STDDEV_POP({q}) > 0 FROM {t}")),
                json!({"column": n.name}),
            )
        }
        "fact_checking" => {
            let n = p.pick(&cols.numeric)?;
            let lo: f64 = n.min.as_ref()?.parse().ok()?;
            let hi: f64 = n.max.as_ref()?.parse().ok()?;
            let threshold = ((lo + hi) / 2.0 * 100.0).round() / 100.0;
            d(
                format!("True or false: the average `{}` in the `{tn}` table is greater than {threshold}.", n.name),
                format!("SELECT CASE WHEN AVG({}) > {threshold} THEN 'True' ELSE 'False' END FROM {t}", ident(&n.name)),
                Some(format!("SELECT AVG({}) <> {threshold} FROM {t}", ident(&n.name))),
                json!({"column": n.name, "threshold": threshold}),
            )
        }
        "multi_hop_numerical_reasoning" => {
            let (c, n) = (p.pick(&cols.categorical)?, p.pick(&cols.numeric)?);
            let cq = ident(&c.name);
            let counts = format!("SELECT {cq} AS g, COUNT(*) AS k FROM {t} WHERE {cq} IS NOT NULL GROUP BY {cq}");
            d(
                format!(
                    "In the `{tn}` table, take the value of `{}` that appears in the most rows. What is the average `{}` over the rows with that value?",
                    c.name, n.name
                ),
                format!(
                    "SELECT AVG({}) FROM {t} WHERE {cq} = (SELECT g FROM ({counts}) ORDER BY k DESC LIMIT 1)",
                    ident(&n.name)
                ),
                Some(format!("SELECT COUNT(*) = 1 FROM ({counts}) WHERE k = (SELECT MAX(k) FROM ({counts}))")),
                json!({"group": c.name, "column": n.name}),
            )
        }
        "time_based_calculation" => {
            if let Some(dc) = p.pick(&cols.dates) {
                let q = format!("CAST(CAST({} AS DATE) AS BIGINT)", ident(&dc.name));
                return d(
                    format!(
                        "How many days are there between the earliest and the latest `{}` in the `{tn}` table?",
                        dc.name
                    ),
                    format!("SELECT MAX({q}) - MIN({q}) FROM {t}"),
                    None,
                    json!({"column": dc.name, "kind": "days"}),
                );
            }
            let years: Vec<&&ColumnProfile> = cols
                .all
                .iter()
                .filter(|c| c.name.to_lowercase().contains("year") && c.data_type.starts_with("Int"))
                .collect();
            let y = p.pick(&years)?;
            let yq = ident(&y.name);
            let counts = format!("SELECT {yq} AS g, COUNT(*) AS k FROM {t} WHERE {yq} IS NOT NULL GROUP BY {yq}");
            d(
                format!("In the `{tn}` table, which `{}` has the most rows?", y.name),
                format!("SELECT g FROM ({counts}) ORDER BY k DESC LIMIT 1"),
                Some(format!("SELECT COUNT(*) = 1 FROM ({counts}) WHERE k = (SELECT MAX(k) FROM ({counts}))")),
                json!({"column": y.name, "kind": "busiest_year"}),
            )
        }
        "feature_engineering" => {
            let (a, b) = p.pick_two(&cols.numeric)?;
            let (aq, bq) = (ident(&a.name), ident(&b.name));
            d(
                format!(
                    "Add a column equal to `{}` divided by `{}` to the `{tn}` table, for rows where both are present and `{}` is not zero. What is the mean of the new column?",
                    a.name, b.name, b.name
                ),
                format!(
                    "SELECT AVG(CAST({aq} AS DOUBLE) / CAST({bq} AS DOUBLE)) FROM {t} WHERE {aq} IS NOT NULL AND {bq} IS NOT NULL AND {bq} <> 0"
                ),
                None,
                json!({"a": a.name, "b": b.name}),
            )
        }
        "comprehensive_data_preprocessing" => {
            let c = p.pick(&cols.all)?;
            d(
                format!(
                    "Starting from the `{tn}` table, drop the rows where `{}` is missing, then remove exact duplicate rows. How many rows remain?",
                    c.name
                ),
                format!("SELECT COUNT(*) FROM (SELECT DISTINCT * FROM {t} WHERE {} IS NOT NULL)", ident(&c.name)),
                None,
                json!({"column": c.name}),
            )
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_are_deterministic_and_distinct() {
        let items = [1, 2, 3];
        let (a, b) = Picker::new(&["t", "c"]).pick_two(&items).unwrap();
        assert_ne!(a, b);
        assert_eq!(Picker::new(&["t", "c"]).pick_two(&items), Some((a, b)));
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(lit("it's"), "'it''s'");
    }
}
