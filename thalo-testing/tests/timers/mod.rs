//! A process manager that does with its timers what its events say, for the timer tests
//! of both runners. (`thalo-postgres/tests/process.rs` includes this file too.)
//!
//! A `Plan` instance schedules named timers (`Schedule { timer, after_ms, on_fire }`)
//! and cancels them (`Cancel { timer }`). A firing timer records itself on the plan
//! (`RecordFiring`, so every firing is an event of the plan's stream) and then does what
//! its `on_fire` script says: `""` nothing, `"complete"` completes the instance,
//! `"cancel:NAME"` cancels the timer `NAME`, `"set:NAME:MS"` sets the timer `NAME` to
//! fire after `MS` milliseconds.

#![allow(dead_code, missing_docs, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thalo::{
    commands, events, Action, Aggregate, Error, EventEnvelope, EventStore, ProcessManager,
    Repository,
};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Plan {
    #[identity]
    id: String,
}

#[commands]
impl Plan {
    pub fn schedule(
        &self,
        timer: String,
        after_ms: u64,
        on_fire: String,
    ) -> Result<ScheduledEvent, Error> {
        Ok(ScheduledEvent {
            timer,
            after_ms,
            on_fire,
        })
    }

    pub fn cancel(&self, timer: String) -> Result<CancelledEvent, Error> {
        Ok(CancelledEvent { timer })
    }

    pub fn record_firing(&self, timer: String) -> Result<FiredEvent, Error> {
        Ok(FiredEvent { timer })
    }
}

#[events]
impl Plan {
    pub fn scheduled(&mut self, timer: String, after_ms: u64, on_fire: String) {
        let _ = (timer, after_ms, on_fire);
    }

    pub fn cancelled(&mut self, timer: String) {
        let _ = timer;
    }

    pub fn fired(&mut self, timer: String) {
        let _ = timer;
    }
}

thalo::event_set! {
    /// What the timer process manager reads: plans only.
    pub enum Plans {
        Plan(Plan),
    }
}

/// The process manager: one instance per plan.
#[derive(Clone, Debug)]
pub struct Timers;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimersState {
    pub plan: String,
    /// The `on_fire` script of each timer, by name.
    pub on_fire: BTreeMap<String, String>,
    /// The timers fired, in order.
    pub fired: Vec<String>,
}

impl ProcessManager for Timers {
    type Event = Plans;
    type State = TimersState;

    fn name(&self) -> &str {
        "timers"
    }

    fn correlate(&self, envelope: &EventEnvelope<Plans>) -> Option<String> {
        Some(envelope.aggregate_id.clone())
    }

    fn react<S: EventStore>(
        &self,
        state: &mut TimersState,
        envelope: &EventEnvelope<Plans>,
    ) -> Result<Vec<Action<S>>, Error> {
        state.plan = envelope.aggregate_id.clone();
        Ok(match &envelope.event {
            Plans::Plan(PlanEvent::Scheduled(e)) => {
                state.on_fire.insert(e.timer.clone(), e.on_fire.clone());
                vec![Action::set_timer(
                    e.timer.clone(),
                    Duration::from_millis(e.after_ms),
                )]
            }
            Plans::Plan(PlanEvent::Cancelled(e)) => vec![Action::cancel_timer(e.timer.clone())],
            Plans::Plan(PlanEvent::Fired(_)) => Vec::new(),
        })
    }

    fn on_timer<S: EventStore>(
        &self,
        state: &mut TimersState,
        timer: &str,
    ) -> Result<Vec<Action<S>>, Error> {
        state.fired.push(timer.to_owned());
        let mut actions = vec![Action::command::<Plan>(
            "record-firing",
            state.plan.clone(),
            PlanCommand::RecordFiring {
                timer: timer.to_owned(),
            },
        )];
        let script = state.on_fire.get(timer).cloned().unwrap_or_default();
        let parts: Vec<&str> = script.split(':').collect();
        match parts.as_slice() {
            [""] => {}
            ["complete"] => actions.push(Action::Complete),
            ["cancel", name] => actions.push(Action::cancel_timer(*name)),
            ["set", name, ms] => {
                let ms = ms
                    .parse()
                    .map_err(|_| Error::handler("timers", format!("bad delay in `{script}`")))?;
                actions.push(Action::set_timer(*name, Duration::from_millis(ms)));
            }
            _ => return Err(Error::handler("timers", format!("bad script `{script}`"))),
        }
        Ok(actions)
    }
}

/// Schedules the timer `timer` of `plan` after `after_ms`, with its `on_fire` script.
pub async fn schedule<S: EventStore>(
    repo: &Repository<S>,
    plan: &str,
    timer: &str,
    after_ms: u64,
    on_fire: &str,
) {
    repo.execute::<Plan>(
        &plan.to_owned(),
        PlanCommand::Schedule {
            timer: timer.to_owned(),
            after_ms,
            on_fire: on_fire.to_owned(),
        },
    )
    .await
    .unwrap();
}

/// Cancels the timer `timer` of `plan`.
pub async fn cancel<S: EventStore>(repo: &Repository<S>, plan: &str, timer: &str) {
    repo.execute::<Plan>(
        &plan.to_owned(),
        PlanCommand::Cancel {
            timer: timer.to_owned(),
        },
    )
    .await
    .unwrap();
}

/// The timers of `plan` that fired, in order, from its stream.
pub async fn fired<S: EventStore>(store: &S, plan: &str) -> Vec<String> {
    store
        .read_stream::<Plan>(&plan.to_owned(), 0)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            PlanEvent::Fired(f) => Some(f.timer),
            _ => None,
        })
        .collect()
}
