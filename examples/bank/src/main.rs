//! `cargo run -p bank`: a walk-through of the bank on the embedded, in-memory store.

// Amounts in cents are written as `dollars_cents` (`100_00` is $100.00).
#![allow(clippy::inconsistent_digit_grouping)]

use std::time::Duration;

use anyhow::Context as _;
use bank::money::format_cents;
use bank::{Balances, BankAccount, BankAccountCommand};
use thalo::{Event as _, EventStore, InMemoryEventStore, Metadata, Repository, Subscription};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let store = InMemoryEventStore::new();
    println!("Thalo bank: embedded mode (in-memory store, in-process projection)\n");
    walk_through(store).await
}

async fn walk_through<S>(store: S) -> anyhow::Result<()>
where
    S: EventStore + thalo::CheckpointStore + Clone + 'static,
{
    let repo = Repository::new(store.clone());
    let metadata = Metadata::new().with_header("source", "walk-through");

    let steps: Vec<(&str, BankAccountCommand)> = vec![
        (
            "ACC-001",
            BankAccountCommand::OpenAccount {
                owner: "Ada Lovelace".into(),
                initial_deposit: 100_00,
            },
        ),
        (
            "ACC-002",
            BankAccountCommand::OpenAccount {
                owner: "Alan Turing".into(),
                initial_deposit: 25_00,
            },
        ),
        ("ACC-001", BankAccountCommand::Deposit { amount: 42_50 }),
        ("ACC-002", BankAccountCommand::Withdraw { amount: 10_00 }),
        ("ACC-002", BankAccountCommand::Withdraw { amount: 500_00 }),
        (
            "ACC-003",
            BankAccountCommand::OpenAccount {
                owner: "Grace Hopper".into(),
                initial_deposit: 0,
            },
        ),
        ("ACC-003", BankAccountCommand::Deposit { amount: 7_25 }),
        ("ACC-003", BankAccountCommand::CloseAccount),
        ("ACC-003", BankAccountCommand::Deposit { amount: 1_00 }),
    ];

    println!("Commands:");
    for (account, command) in steps {
        let id = account.to_string();
        let described = format!("{command:?}");
        match repo
            .execute_with::<BankAccount>(&id, command, &metadata)
            .await
        {
            Ok(stored) => {
                let events: Vec<_> = stored.iter().map(|e| e.event.event_type()).collect();
                println!("  ok       {account} {described} -> {}", events.join(", "));
            }
            Err(err) if err.is_rejection() => {
                println!(
                    "  rejected {account} {described} -> {}",
                    err.code().unwrap_or("rejected")
                );
                println!("           ({err})");
            }
            Err(err) => return Err(err).context("command failed"),
        }
    }

    let mut subscription = Subscription::new::<BankAccount>(store.clone(), Balances::default())
        .with_idle_timeout(Duration::from_millis(100));
    let handled = subscription.catch_up().await.context("projection failed")?;
    println!("\nBalances (projection, {handled} events):");
    for row in subscription.projection().all() {
        println!(
            "  {:<8} {:<14} {:>12}{}",
            row.account_number,
            row.owner,
            format_cents(row.balance),
            if row.closed { "  (closed)" } else { "" }
        );
    }

    println!("\nStored events (global order):");
    let mut after = 0;
    loop {
        let page = store.read_all(after, 100).await.context("reading events")?;
        let Some(last) = page.last() else { break };
        after = last.position;
        for e in &page {
            println!(
                "  #{:<3} {} {}#{} {:<15} v{} {}",
                e.position,
                e.timestamp.format("%H:%M:%S%.3f"),
                e.aggregate_id,
                e.sequence,
                e.event.event_type,
                e.event.version,
                e.event.payload
            );
        }
    }

    let ada = repo.load::<BankAccount>(&"ACC-001".to_string()).await?;
    println!(
        "\nACC-001 rebuilt from {} events: {} owned by {}",
        ada.version,
        format_cents(ada.aggregate.balance()),
        ada.aggregate.owner()
    );
    Ok(())
}
