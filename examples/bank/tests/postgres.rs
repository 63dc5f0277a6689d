//! The bank CLI on Postgres: state persists between runs.

use std::process::Command;

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/thalo_test".to_owned())
}

fn bank(schema: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bank"))
        .args(args)
        .env("DATABASE_URL", database_url())
        .env("BANK_SCHEMA", schema)
        .output()
        .expect("run the bank binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("error: connecting"),
        "Postgres is not reachable at DATABASE_URL={} (scripts/test.sh starts it): {stderr}",
        database_url()
    );
    (out.status.success(), format!("{stdout}{stderr}"))
}

fn balance_line<'a>(out: &'a str, account: &str) -> &'a str {
    out.lines()
        .find(|l| l.trim_start().starts_with(account) && l.contains('$'))
        .unwrap_or_else(|| panic!("no balance line for {account} in:\n{out}"))
}

#[test]
fn the_walk_through_persists_and_a_second_run_sees_the_first() {
    let schema = format!("bank_{}", uuid::Uuid::new_v4().simple());

    let (ok, first) = bank(&schema, &[]);
    assert!(ok, "{first}");
    assert!(first.contains("Thalo bank on Postgres"), "{first}");
    assert!(
        balance_line(&first, "ACC-001").contains("$142.50"),
        "{first}"
    );
    assert!(
        balance_line(&first, "ACC-002").contains("$15.00"),
        "{first}"
    );
    assert!(
        balance_line(&first, "ACC-003").contains("(closed)"),
        "{first}"
    );

    let (ok, second) = bank(&schema, &[]);
    assert!(ok, "{second}");
    assert!(second.contains("ACCOUNT_ALREADY_OPENED"), "{second}");
    // The second run's deposit lands on the first run's balance.
    assert!(
        balance_line(&second, "ACC-001").contains("$185.00"),
        "{second}"
    );
    assert!(
        balance_line(&second, "ACC-002").contains("$5.00"),
        "{second}"
    );
}

#[test]
fn subcommands_work_on_the_same_store() {
    let schema = format!("bank_{}", uuid::Uuid::new_v4().simple());

    let (ok, out) = bank(&schema, &["open", "ACC-9", "Ada", "10.00"]);
    assert!(ok && out.contains("AccountOpened"), "{out}");
    let (ok, out) = bank(&schema, &["deposit", "ACC-9", "2.50"]);
    assert!(ok && out.contains("FundsDeposited"), "{out}");
    let (ok, out) = bank(&schema, &["withdraw", "ACC-9", "100"]);
    assert!(!ok, "an overdraft exits non-zero: {out}");
    assert!(out.contains("INSUFFICIENT_FUNDS"), "{out}");
    let (ok, out) = bank(&schema, &["deposit", "ACC-9", "abc"]);
    assert!(!ok && out.contains("is not an amount"), "{out}");

    let (ok, out) = bank(&schema, &["show", "ACC-9"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ACC-9 (rebuilt from 2 events): $12.50 owned by Ada, open"),
        "{out}"
    );

    let (ok, out) = bank(&schema, &["balances"]);
    assert!(ok, "{out}");
    assert!(balance_line(&out, "ACC-9").contains("$12.50"), "{out}");

    let (ok, out) = bank(&schema, &["events", "ACC-9"]);
    assert!(ok, "{out}");
    assert!(out.contains("ACC-9#1 AccountOpened"), "{out}");
    assert!(out.contains("ACC-9#2 FundsDeposited"), "{out}");

    let (ok, out) = bank(&schema, &["show", "NOPE"]);
    assert!(!ok && out.contains("no such account"), "{out}");
}
