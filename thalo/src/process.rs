//! Process managers: state per instance, reacting to the events of several aggregates
//! with commands issued exactly once, and timers.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::{Aggregate, CommandId, Error, EventEnvelope, EventSet, EventStore, Repository};

/// A process manager (a saga): it follows the events of several aggregates (an
/// [`EventSet`]), keeps a state per instance (one transfer, one order),
/// and reacts with [`Action`]s: commands to aggregates, timers, completion.
///
/// The runners ([`ProcessRunner`](crate::ProcessRunner) in memory,
/// `thalo_postgres::PgProcessManager` durably) feed it every event of its aggregate
/// types in the store's global order. For each event they
///
/// 1. ask [`correlate`](ProcessManager::correlate) which instance it belongs to (none:
///    the event is ignored, and so is an event of an instance that has completed),
/// 2. load that instance's state (or [`Default`] for a new one) and call
///    [`react`](ProcessManager::react),
/// 3. execute the commands it returned in order with
///    [`Repository::execute_once`], each under the key
///    [`CommandId::caused_by`]`(event, step)`; a command the aggregate rejects
///    ([`Error::is_rejection`]) goes to [`on_rejected`](ProcessManager::on_rejected),
///    whose actions are executed the same way,
/// 4. then save the new state, the timers and the checkpoint together.
///
/// # Exactly once, and why `react` must be deterministic
///
/// Commands are not stored before they are executed. A runner that crashes after
/// executing an event's commands but before saving runs the event again from the same
/// saved state: the same state and event must give the same commands with the same
/// steps, so that they get the same keys and the repository replays them
/// ([`Once::Replayed`](crate::Once::Replayed)) instead of executing them twice. A
/// rejection is recorded with its key too, so the replay is rejected identically and
/// `on_rejected` decides the same way. So `react`, `on_timer` and `on_rejected` must be
/// functions of their arguments: no clock, no random ids, no I/O (take what you need
/// from the event: its [`timestamp`](EventEnvelope::timestamp) and [`id`](EventEnvelope::id)
/// are stable). A step name must be unique among the commands of one event or timer.
///
/// # Timers
///
/// [`Action::SetTimer`] asks for [`on_timer`](ProcessManager::on_timer) to be called for
/// the instance after a delay, unless [`Action::CancelTimer`] cancels it first; setting a
/// timer of the same name again replaces it, and completing the instance cancels all its
/// timers. A timer fires once, and only while it is pending: one that an earlier input
/// cancelled or replaced, even a timer due at the same moment that fired just before it,
/// does not fire (a replacement fires at its own time), and a completed instance's
/// timers never fire. Its commands are keyed by the timer's own id and the step, so a
/// firing interrupted by a crash is replayed like an event.
///
/// # Races between a timer and an event
///
/// An instance's inputs (events and timers) are handled one at a time, and after a
/// crash they are replayed in their original order: the durable runner records an
/// input as pending, in its own transaction, before executing its commands, and clears
/// the mark in the transaction that saves the state. If a crash interrupts a timer's
/// firing (its commands executed, its state not saved), the next runner fires that
/// timer again, from the saved state and under the same keys, before it hands the
/// instance any other input; an interrupted batch of events is replayed before any of
/// the instance's timers fires. So a state that chose one of two mutually exclusive
/// commands (refund *or* deposit) never meets the other input without knowing the
/// choice. Deciding such a race on an aggregate is still a good design when the outcome
/// is part of the domain and others must see it: record it there (a `Transfer` that
/// accepts either `TimeOut` or `RecordWithdrawal`, whichever comes first, and rejects
/// the other), and issue the exclusive commands in reaction to that aggregate's events,
/// as the bank's transfers (`examples/bank/src/transfer.rs`) do; their crash test
/// (`transfers_crash`) checks that no transfer is both paid and refunded.
pub trait ProcessManager: Send + Sync + 'static {
    /// The events it follows: an [`EventSet`] (declared with
    /// [`event_set!`](crate::event_set); one variant for a single aggregate type).
    type Event: EventSet;
    /// The state of one instance. Serialized as JSON by the Postgres runner.
    type State: Serialize + DeserializeOwned + Default + Clone + fmt::Debug + Send + Sync;

    /// The stable name: the runner's checkpoint and the key of its states and timers.
    fn name(&self) -> &str;

    /// The instance `envelope`'s event belongs to, or `None` to ignore the event.
    fn correlate(&self, envelope: &EventEnvelope<Self::Event>) -> Option<String>;

    /// Updates the instance's state for an event and returns what to do. Must be
    /// deterministic (see the [trait docs](ProcessManager)).
    ///
    /// # Errors
    ///
    /// An error stops the runner at this event (it is reported as [`Error::Handler`]);
    /// nothing of the event is saved.
    fn react<S: EventStore>(
        &self,
        state: &mut Self::State,
        envelope: &EventEnvelope<Self::Event>,
    ) -> Result<Vec<Action<S>>, Error>;

    /// Updates the instance's state when its timer `timer` fires and returns what to do.
    /// The default does nothing.
    ///
    /// # Errors
    ///
    /// As [`react`](ProcessManager::react); the timer stays due.
    fn on_timer<S: EventStore>(
        &self,
        state: &mut Self::State,
        timer: &str,
    ) -> Result<Vec<Action<S>>, Error> {
        let _ = (state, timer);
        Ok(Vec::new())
    }

    /// Updates the instance's state when the command of `step` was rejected by its
    /// aggregate (`error` is the rejection: [`Error::Invariant`] or [`Error::Domain`])
    /// and returns what to do instead, e.g. a compensating command. The default does
    /// nothing.
    ///
    /// # Errors
    ///
    /// As [`react`](ProcessManager::react).
    fn on_rejected<S: EventStore>(
        &self,
        state: &mut Self::State,
        step: &str,
        error: &Error,
    ) -> Result<Vec<Action<S>>, Error> {
        let _ = (state, step, error);
        Ok(Vec::new())
    }
}

/// What a [`ProcessManager`] asks for. `S` is the store its commands run against; the
/// runner picks it.
pub enum Action<S> {
    /// Execute a command, exactly once ([`Action::command`]).
    Command(Command<S>),
    /// Call [`ProcessManager::on_timer`] with `name` after `after`; replaces a timer of
    /// the same name.
    SetTimer {
        /// The timer's name, unique per instance.
        name: String,
        /// The delay from now.
        after: Duration,
    },
    /// Cancel the timer `name`, if it is set.
    CancelTimer {
        /// The timer's name.
        name: String,
    },
    /// The instance is done: its timers are cancelled and its later events ignored.
    Complete,
}

impl<S: EventStore> Action<S> {
    /// Execute `command` on aggregate `A` with identity `id`, as step `step` (unique
    /// among the commands of one event or timer: with the event or timer it makes the
    /// command's idempotency key).
    pub fn command<A>(step: impl Into<String>, id: A::Id, command: A::Command) -> Self
    where
        A: Aggregate,
        // `execute_once` holds `&command` across its awaits, and the runners' futures
        // are `Send`.
        A::Command: Clone + Sync,
    {
        let description = format!("{command:?}");
        let aggregate_id = id.to_string();
        Action::Command(Command {
            step: step.into(),
            aggregate_type: A::TYPE,
            aggregate_id,
            description,
            run: Box::new(move |repository, key| {
                Box::pin(async move {
                    repository
                        .execute_once::<A>(&id, key, command)
                        .await
                        .map(|_| ())
                })
            }),
        })
    }

    /// Set the timer `name` to fire after `after` ([`Action::SetTimer`]).
    pub fn set_timer(name: impl Into<String>, after: Duration) -> Self {
        Action::SetTimer {
            name: name.into(),
            after,
        }
    }

    /// Cancel the timer `name` ([`Action::CancelTimer`]).
    pub fn cancel_timer(name: impl Into<String>) -> Self {
        Action::CancelTimer { name: name.into() }
    }
}

impl<S> fmt::Debug for Action<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Command(command) => fmt::Debug::fmt(command, f),
            Action::SetTimer { name, after } => f
                .debug_struct("SetTimer")
                .field("name", name)
                .field("after", after)
                .finish(),
            Action::CancelTimer { name } => {
                f.debug_struct("CancelTimer").field("name", name).finish()
            }
            Action::Complete => f.write_str("Complete"),
        }
    }
}

type RunCommand<S> = Box<
    dyn for<'r> FnOnce(
            &'r Repository<S>,
            CommandId,
        ) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'r>>
        + Send,
>;

/// A command a process manager issues, type-erased, with a description to inspect in
/// tests: `Display` prints `step: aggregate_type/aggregate_id Command { .. }`.
pub struct Command<S> {
    step: String,
    aggregate_type: &'static str,
    aggregate_id: String,
    description: String,
    run: RunCommand<S>,
}

impl<S> Command<S> {
    /// The step: with the causing event or timer, the command's idempotency key.
    pub fn step(&self) -> &str {
        &self.step
    }

    /// The aggregate type the command is for.
    pub fn aggregate_type(&self) -> &'static str {
        self.aggregate_type
    }

    /// The aggregate's identity, as text.
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }

    /// The command's `Debug` text.
    pub fn description(&self) -> &str {
        &self.description
    }
}

impl<S> fmt::Debug for Command<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("step", &self.step)
            .field("aggregate_type", &self.aggregate_type)
            .field("aggregate_id", &self.aggregate_id)
            .field("command", &format_args!("{}", self.description))
            .finish()
    }
}

impl<S> fmt::Display for Command<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}/{} {}",
            self.step, self.aggregate_type, self.aggregate_id, self.description
        )
    }
}

/// A change to an instance's timers, in the order the actions asked for them.
#[doc(hidden)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimerChange {
    /// Set (or replace) the timer.
    Set {
        /// Its name.
        name: String,
        /// Its delay.
        after: Duration,
    },
    /// Cancel the timer.
    Cancel {
        /// Its name.
        name: String,
    },
}

/// What executing an instance's actions left to save. Shared with `thalo-postgres`
/// through `__private`; not a public API.
#[doc(hidden)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Timer changes, in order.
    pub timers: Vec<TimerChange>,
    /// Whether the instance completed.
    pub completed: bool,
    /// Commands executed (stored or replayed) and rejected.
    pub commands: u64,
}

/// The most rounds of `on_rejected` one event or timer may go through: a process
/// manager that compensates a rejection with a command that is rejected again, forever,
/// stops instead of looping.
#[doc(hidden)]
pub const MAX_REJECTION_ROUNDS: usize = 16;

/// The key of the command of `step` caused by the event or timer `cause`: the same as
/// [`CommandId::caused_by`] for an event.
#[doc(hidden)]
pub fn command_key(cause: Uuid, step: &str) -> CommandId {
    CommandId::from(Uuid::new_v5(&cause, step.as_bytes()))
}

/// Executes `actions` of the event or timer `cause` for one instance: commands in order
/// (rejections through `on_rejected`), timer changes and completion collected for the
/// caller to save with the state. Shared with `thalo-postgres` through `__private`.
///
/// # Errors
///
/// A command's error that is not a rejection (the store's), or `on_rejected`'s error
/// (as [`Error::Handler`]).
#[doc(hidden)]
pub async fn execute_actions<P, S>(
    manager: &P,
    repository: &Repository<S>,
    state: &mut P::State,
    cause: Uuid,
    actions: Vec<Action<S>>,
) -> Result<Effects, Error>
where
    P: ProcessManager,
    S: EventStore,
{
    let mut effects = Effects::default();
    let mut queue: VecDeque<Action<S>> = actions.into();
    let mut rounds = 0;
    while let Some(action) = queue.pop_front() {
        match action {
            Action::Command(command) => {
                let key = command_key(cause, &command.step);
                let step = command.step;
                effects.commands += 1;
                match (command.run)(repository, key).await {
                    Ok(()) => {}
                    Err(err) if err.is_rejection() => {
                        rounds += 1;
                        if rounds > MAX_REJECTION_ROUNDS {
                            return Err(Error::handler(
                                manager.name(),
                                format!("more than {MAX_REJECTION_ROUNDS} rejected commands in a row (last: step `{step}`: {err})"),
                            ));
                        }
                        let more = manager
                            .on_rejected::<S>(state, &step, &err)
                            .map_err(|e| handler_error(manager.name(), e))?;
                        // The compensation runs next, before the rest of the actions.
                        for action in more.into_iter().rev() {
                            queue.push_front(action);
                        }
                    }
                    Err(err) => return Err(err),
                }
            }
            Action::SetTimer { name, after } => {
                effects.timers.push(TimerChange::Set { name, after })
            }
            Action::CancelTimer { name } => effects.timers.push(TimerChange::Cancel { name }),
            Action::Complete => effects.completed = true,
        }
    }
    Ok(effects)
}

/// `error` from a process manager's own code, as [`Error::Handler`].
#[doc(hidden)]
pub fn handler_error(name: &str, error: Error) -> Error {
    match error {
        err @ Error::Handler { .. } => err,
        err => Error::handler(name, err),
    }
}
