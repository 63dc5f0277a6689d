//! A careful client: one idempotency key per command, retried until it gets a
//! definitive answer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

/// What each account is opened with, in cents.
pub const INITIAL_DEPOSIT: i64 = 10_000;

/// How long a client keeps retrying one command before it gives up (a failure).
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);

/// Counters shared by the clients.
#[derive(Debug, Default)]
pub struct Tally {
    sent: AtomicU64,
    attempts: AtomicU64,
    acknowledged: AtomicU64,
    rejected: AtomicU64,
    replayed: AtomicU64,
}

impl Tally {
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::SeqCst)
    }
    /// Attempts whose outcome the client could not know (no answer, 5xx, 409), each
    /// retried with the same key.
    pub fn retries(&self) -> u64 {
        self.attempts.load(Ordering::SeqCst) - self.sent.load(Ordering::SeqCst)
    }
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::SeqCst)
    }
    pub fn replayed(&self) -> u64 {
        self.replayed.load(Ordering::SeqCst)
    }
}

/// The kind of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Open,
    Deposit,
    Withdraw,
}

/// One command as the client saw it end.
#[derive(Clone, Debug)]
pub struct Command {
    pub key: String,
    pub account: String,
    pub kind: Kind,
    pub amount: i64,
    pub attempts: u32,
    pub answer: Answer,
}

/// The definitive answer to a command.
#[derive(Clone, Debug)]
pub enum Answer {
    /// 2xx, with the id of the event it stored.
    Acknowledged { event_id: String },
    /// 4xx, with its code.
    Rejected { status: u16, code: String },
}

/// The bank's HTTP API.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub fn new(base: String) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(2))
            .build()?;
        Ok(Client { http, base })
    }

    /// Opens `account`; it must be acknowledged.
    pub async fn open(
        &self,
        account: &str,
        initial: i64,
        tally: &Tally,
    ) -> anyhow::Result<Command> {
        let command = self
            .execute(
                account,
                Kind::Open,
                initial,
                &format!("open-{account}-{}", uuid::Uuid::new_v4().simple()),
                tally,
            )
            .await?;
        if let Answer::Rejected { status, code } = &command.answer {
            bail!("opening {account} was rejected: {status} {code}");
        }
        Ok(command)
    }

    /// Deposits and withdrawals on random accounts until `loading` turns false; the
    /// command in flight then is finished (retried to a definitive answer).
    pub async fn run(
        &self,
        n: usize,
        accounts: &[String],
        loading: &AtomicBool,
        tally: &Tally,
        think: Duration,
    ) -> anyhow::Result<Vec<Command>> {
        let mut random = XorShift::new(n as u64 + 1);
        let mut done = Vec::new();
        while loading.load(Ordering::SeqCst) {
            let account = &accounts[random.below(accounts.len() as u64) as usize];
            let kind = if random.below(2) == 0 {
                Kind::Deposit
            } else {
                Kind::Withdraw
            };
            let amount = 1 + random.below(500) as i64;
            let key = uuid::Uuid::new_v4().to_string();
            done.push(self.execute(account, kind, amount, &key, tally).await?);
            tokio::time::sleep(think).await;
        }
        Ok(done)
    }

    /// Sends one command, retrying with the same key until the answer is definitive.
    async fn execute(
        &self,
        account: &str,
        kind: Kind,
        amount: i64,
        key: &str,
        tally: &Tally,
    ) -> anyhow::Result<Command> {
        let (url, body) = match kind {
            Kind::Open => (
                format!("{}/accounts", self.base),
                json!({"account_number": account, "owner": "Faults", "initial_deposit": amount}),
            ),
            Kind::Deposit => (
                format!("{}/accounts/{account}/deposit", self.base),
                json!({ "amount": amount }),
            ),
            Kind::Withdraw => (
                format!("{}/accounts/{account}/withdraw", self.base),
                json!({ "amount": amount }),
            ),
        };
        tally.sent.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        let mut attempts = 0;
        let mut backoff = Duration::from_millis(50);
        loop {
            attempts += 1;
            tally.attempts.fetch_add(1, Ordering::SeqCst);
            let sent = self
                .http
                .post(&url)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await;
            let answer = match sent {
                Ok(res) => {
                    let status = res.status().as_u16();
                    let replayed = res
                        .headers()
                        .get("idempotent-replayed")
                        .is_some_and(|v| v == "true");
                    // A body that cannot be read is an answer the client did not get.
                    match res.json::<Value>().await {
                        Ok(body) if (200..300).contains(&status) => {
                            let event_id = body[0]["id"]
                                .as_str()
                                .context("an acknowledgement without an event")?
                                .to_owned();
                            if replayed {
                                tally.replayed.fetch_add(1, Ordering::SeqCst);
                            }
                            Some(Answer::Acknowledged { event_id })
                        }
                        // 409: a conflict that outlasted the service's retries, and 5xx:
                        // nothing or something was stored; the same key makes a retry
                        // safe either way.
                        Ok(_) if status == 409 || status >= 500 => None,
                        Ok(body) => Some(Answer::Rejected {
                            status,
                            code: body["code"].as_str().unwrap_or_default().to_owned(),
                        }),
                        Err(_) => None,
                    }
                }
                Err(_) => None,
            };
            match answer {
                Some(answer) => {
                    match &answer {
                        Answer::Acknowledged { .. } => {
                            tally.acknowledged.fetch_add(1, Ordering::SeqCst)
                        }
                        Answer::Rejected { .. } => tally.rejected.fetch_add(1, Ordering::SeqCst),
                    };
                    return Ok(Command {
                        key: key.to_owned(),
                        account: account.to_owned(),
                        kind,
                        amount,
                        attempts,
                        answer,
                    });
                }
                None => {
                    if started.elapsed() > GIVE_UP_AFTER {
                        bail!("no definitive answer for {key} ({kind:?} {account}) after {attempts} attempts");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// A small deterministic generator (xorshift64*), enough to pick accounts and amounts.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}
