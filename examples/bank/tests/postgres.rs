//! The bank CLI on Postgres: state persists between runs.

mod common;

use common::{assert_walk_through_transfers, balance_line};
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

#[test]
fn the_walk_through_persists_and_a_second_run_sees_the_first() {
    let schema = format!("bank_{}", uuid::Uuid::new_v4().simple());

    let (ok, first) = bank(&schema, &[]);
    assert!(ok, "{first}");
    assert!(first.contains("Thalo bank on Postgres"), "{first}");
    assert_walk_through_transfers(&first);
    assert!(
        balance_line(&first, "ACC-001").contains("$122.50"),
        "{first}"
    );
    assert!(
        balance_line(&first, "ACC-002").contains("$35.00"),
        "{first}"
    );
    assert!(
        balance_line(&first, "ACC-003").contains("(closed)"),
        "{first}"
    );

    let (ok, second) = bank(&schema, &[]);
    assert!(ok, "{second}");
    assert!(second.contains("ACCOUNT_ALREADY_OPENED"), "{second}");
    assert!(second.contains("TRANSFER_ALREADY_REQUESTED"), "{second}");
    // The second run's deposit lands on the first run's balance (after its transfer of
    // $20.00 from ACC-001 to ACC-002; the transfer compensated moved nothing).
    assert!(
        balance_line(&second, "ACC-001").contains("$165.00"),
        "{second}"
    );
    assert!(
        balance_line(&second, "ACC-002").contains("$25.00"),
        "{second}"
    );
}

/// `cargo run -p bank` with no `DATABASE_URL`: the walk-through on the embedded,
/// in-memory store, with the transfer process manager run in process by a
/// `ProcessRunner`.
#[test]
fn the_walk_through_runs_embedded_without_a_database() {
    let out = Command::new(env!("CARGO_BIN_EXE_bank"))
        .env_remove("DATABASE_URL")
        .env_remove("KAFKA_BROKERS")
        .env_remove("BANK_SCHEMA")
        .output()
        .expect("run the bank binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stdout}{stderr}", out.status);
    assert!(
        stdout.contains("Thalo bank: embedded mode (in-memory store, in-process projection)"),
        "{stdout}"
    );
    assert!(!stdout.contains("Thalo bank on Postgres"), "{stdout}");
    // The rejected commands of the walk-through, by their codes.
    assert!(stdout.contains("INSUFFICIENT_FUNDS"), "{stdout}");
    assert!(stdout.contains("ACCOUNT_CLOSED"), "{stdout}");
    assert_walk_through_transfers(&stdout);
    // $100.00 + $42.50 - $20.00 (T-1) - $5.00 + $5.00 (T-2, refunded); $25.00 - $10.00
    // + $20.00 (T-1); ACC-003 paid out when it closed.
    assert!(
        balance_line(&stdout, "ACC-001").contains("$122.50"),
        "{stdout}"
    );
    assert!(
        balance_line(&stdout, "ACC-002").contains("$35.00"),
        "{stdout}"
    );
    let closed = balance_line(&stdout, "ACC-003");
    assert!(
        closed.contains("$0.00") && closed.contains("(closed)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ACC-001 (rebuilt from 5 events): $122.50 owned by Ada Lovelace, open"),
        "{stdout}"
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

    // A transfer: the CLI runs the process manager until it settles.
    let (ok, out) = bank(&schema, &["open", "ACC-8", "Alan"]);
    assert!(ok, "{out}");
    let (ok, out) = bank(&schema, &["transfer", "ACC-9", "ACC-8", "2.50"]);
    assert!(ok && out.contains("-> completed"), "{out}");
    let (ok, out) = bank(&schema, &["close", "ACC-8"]);
    assert!(ok, "{out}");
    let (ok, out) = bank(&schema, &["transfer", "ACC-9", "ACC-8", "1"]);
    assert!(
        !ok && out.contains("-> compensated (ACCOUNT_CLOSED)"),
        "{out}"
    );
    let (ok, out) = bank(&schema, &["balances"]);
    assert!(ok, "{out}");
    assert!(balance_line(&out, "ACC-9").contains("$10.00"), "{out}");
}

/// The Postgres read model uses checked arithmetic that saturates like
/// `BankAccount::apply`: a hand-made stream at the edges of `i64` neither fails the
/// projection ("bigint out of range" would retry forever) nor diverges from the fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_model_saturates_like_apply() {
    use bank::account::{AccountOpenedEvent, FundsDepositedEvent, FundsWithdrawnEvent};
    use bank::pg::PgBalances;
    use bank::{BankAccount, BankAccountEvent};
    use thalo::{EventStore, Metadata, Repository};
    use thalo_postgres::{PgEventStore, PgSubscription};

    let schema = format!("bank_sat_{}", uuid::Uuid::new_v4().simple());
    let store = PgEventStore::builder(
        thalo_postgres::sqlx::PgPool::connect(&database_url())
            .await
            .expect("Postgres"),
    )
    .schema(schema.clone())
    .build()
    .expect("store");
    store.migrate().await.expect("migrate");
    let events: Vec<BankAccountEvent> = vec![
        AccountOpenedEvent {
            owner: "Ada".into(),
            initial_deposit: i64::MAX,
        }
        .into(),
        FundsDepositedEvent { amount: i64::MAX }.into(),
        FundsWithdrawnEvent { amount: i64::MAX }.into(),
        FundsWithdrawnEvent { amount: i64::MAX }.into(),
        FundsWithdrawnEvent { amount: i64::MAX }.into(),
        FundsWithdrawnEvent { amount: i64::MIN }.into(),
    ];
    let id = "EDGE".to_owned();
    store
        .append::<BankAccount>(&id, 0, events, &Metadata::default())
        .await
        .expect("append");

    let balances = PgBalances::new(&store).await.expect("read model");
    let subscription = PgSubscription::new::<BankAccount>(store.clone(), balances.clone());
    subscription
        .catch_up()
        .await
        .expect("the projection applies every event");
    let row = balances.get(&id).await.expect("read").expect("row");
    let folded = Repository::new(store.clone())
        .load::<BankAccount>(&id)
        .await
        .expect("load");
    assert_eq!(row.balance, folded.aggregate.balance());
    assert_eq!(row.version, folded.version);

    thalo_postgres::sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(store.pool())
        .await
        .expect("drop schema");
}
