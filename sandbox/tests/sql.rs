//! The SQL tools of SQLite tasks, driven from Python in the sandbox as a model would: the
//! schema and SELECTs work; writes, ATTACH, PRAGMA changes, runaway queries and paths out of
//! the scratch folder are refused with a clear error, and the database never changes.

mod support;

use std::path::{Path, PathBuf};

use kiln_sandbox::CellStatus;
use support::{Task, sandboxes};

fn make_db(dir: &Path) -> PathBuf {
    let path = dir.join("shop.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, city TEXT NOT NULL, amount REAL);
         INSERT INTO orders (city, amount) VALUES ('Lyon', 10.5), ('Nantes', 3), ('Lyon', 4), ('Paris', NULL);
         CREATE VIEW big AS SELECT * FROM orders WHERE amount > 5;",
    )
    .unwrap();
    path
}

fn db_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

async fn sql_task() -> (Vec<Task>, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = make_db(dir.path());
    let mut tasks = Vec::new();
    for sandbox in sandboxes() {
        tasks.push(Task::start(sandbox, Some(db.clone())).await);
    }
    (tasks, dir, db)
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_and_select_work() {
    let (mut tasks, _dir, _db) = sql_task().await;
    for task in &mut tasks {
        let info = task.run("print(get_db_info())").await;
        assert!(info.output.contains("CREATE TABLE orders"), "{info:?}");
        assert!(info.output.contains("CREATE VIEW big"), "{info:?}");
        let cell = task
            .run("df = execute_sql(sql='SELECT city, SUM(amount) AS total FROM orders GROUP BY city ORDER BY city', output_path='out/totals.csv')\nprint(df.to_csv(index=False))")
            .await;
        assert_eq!(cell.status, CellStatus::Ok, "{cell:?}");
        assert_eq!(cell.output.trim(), "city,total\nLyon,14.5\nNantes,3.0\nParis,");
        let csv = std::fs::read_to_string(task.scratch().join("out/totals.csv")).unwrap();
        assert_eq!(csv, "city,total\nLyon,14.5\nNantes,3.0\nParis,\n");
        // The result stays in the worker for the next turn.
        assert_eq!(task.run("print(len(df))").await.output.trim(), "3");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_attach_and_pragmas_are_refused() {
    let (mut tasks, dir, db) = sql_task().await;
    let before = db_bytes(&db);
    let other = dir.path().join("other.sqlite");
    let refused = [
        ("INSERT INTO orders (city, amount) VALUES ('Evil', 1)", "INSERT"),
        ("UPDATE orders SET amount = 0", "UPDATE"),
        ("DELETE FROM orders", "DELETE"),
        ("DROP TABLE orders", "only read-only"),
        ("CREATE TABLE x (a)", "only read-only"),
        (&format!("ATTACH DATABASE '{}' AS other", other.display()), "ATTACH"),
        ("PRAGMA query_only = 0", "PRAGMA"),
        ("PRAGMA journal_mode = WAL", "PRAGMA"),
        ("SELECT 1; SELECT 2", "exactly one statement"),
        ("SELECT 1; DROP TABLE orders", "only read-only"),
        ("VACUUM", "only read-only"),
    ];
    for task in &mut tasks {
        for (sql, why) in &refused {
            let cell = task.run(&format!("execute_sql(sql={sql:?}, output_path='x.csv')")).await;
            let error = cell.error.clone().unwrap_or_default();
            assert!(error.starts_with("SQLError") && error.contains(why), "{sql}: {cell:?}");
        }
        // The worker is still the same one, and reads still work.
        assert_eq!(task.worker.starts(), 1);
        let n = task.run("print(execute_sql(sql='SELECT COUNT(*) AS n FROM orders')['n'][0])").await;
        assert_eq!(n.output.trim(), "4", "{n:?}");
    }
    assert_eq!(db_bytes(&db), before, "the database changed");
    assert!(!other.exists(), "ATTACH created a file");
}

#[tokio::test(flavor = "multi_thread")]
async fn runaway_recursive_cte_is_stopped() {
    let (mut tasks, _dir, _db) = sql_task().await;
    for task in &mut tasks {
        let started = std::time::Instant::now();
        let cell = task
            .run("execute_sql(sql='WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r', output_path='r.csv')")
            .await;
        assert!(cell.error.as_deref().unwrap_or("").contains("was stopped"), "{cell:?}");
        assert!(started.elapsed().as_secs_f64() < 3.5, "took {:?}", started.elapsed());
        assert_eq!(task.worker.starts(), 1, "stopped by the SQL deadline, not by killing the worker");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn results_are_capped_and_paths_stay_in_scratch() {
    let (mut tasks, dir, _db) = sql_task().await;
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for task in &mut tasks {
        let big = task
            .run("df = execute_sql(sql='WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r LIMIT 50000) SELECT n FROM r')\nprint(len(df))")
            .await;
        assert_eq!(big.output.trim(), "10000", "capped at sql_max_rows: {big:?}");
        std::os::unix::fs::symlink(&outside, task.scratch().join("escape")).unwrap();
        for path in ["../x.csv", "/tmp/x.csv", "escape/x.csv", ""] {
            let cell = task.run(&format!("execute_sql(sql='SELECT 1', output_path={path:?})")).await;
            assert!(cell.error.as_deref().unwrap_or("").contains("output_path"), "{path}: {cell:?}");
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "something was written outside");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_without_a_database_get_a_clear_error() {
    for sandbox in sandboxes() {
        let mut task = Task::start(sandbox, None).await;
        let cell = task.run("get_db_info()").await;
        assert!(cell.error.as_deref().unwrap_or("").contains("no database"), "{cell:?}");
    }
}
