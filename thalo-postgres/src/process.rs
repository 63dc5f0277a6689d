//! The durable runner of a process manager: states, timers and checkpoint in Postgres.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use thalo::__private::{execute_actions, handler_error, Backoff, Effects, TimerChange};
use thalo::{Error, EventEnvelope, EventSet, ProcessManager, Repository, Shutdown};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::error::store;
use crate::{checkpoint, global, sql, PgEventStore, SchemaName};

/// The statements of the process-manager tables of one schema.
#[derive(Debug)]
struct ProcessSql {
    lock_key_prefix: String,
    load_state: String,
    save_state: String,
    mark_pending: String,
    set_timer: String,
    cancel_timer: String,
    cancel_all_timers: String,
    delete_timer: String,
    due_timers: String,
    next_due: String,
    pending_timers: String,
    record_firing: String,
    timer_firings: String,
    prune_firings: String,
}

impl ProcessSql {
    fn new(schema: &SchemaName) -> Self {
        let states = schema.qualify("process_states");
        let timers = schema.qualify("process_timers");
        let firings = schema.qualify("process_timer_firings");
        ProcessSql {
            lock_key_prefix: format!("thalo:process:{schema}:"),
            load_state: format!(
                "SELECT state, completed, pending FROM {states} WHERE process_manager = $1 AND instance = $2"
            ),
            save_state: format!(
                "INSERT INTO {states} (process_manager, instance, state, completed, updated_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (process_manager, instance) DO UPDATE
SET state = EXCLUDED.state, completed = EXCLUDED.completed, pending = NULL,
    updated_at = EXCLUDED.updated_at"
            ),
            // Only the marker: an existing row keeps its saved state; a new one gets the
            // default state ($3), which is what an instance without a row starts from.
            mark_pending: format!(
                "INSERT INTO {states} (process_manager, instance, state, completed, pending)
VALUES ($1, $2, $3, false, $4)
ON CONFLICT (process_manager, instance) DO UPDATE SET pending = EXCLUDED.pending"
            ),
            // Due from the statement's clock, not the transaction's start: the commands
            // before it may have taken a while.
            set_timer: format!(
                "INSERT INTO {timers} (id, process_manager, instance, name, due_at)
VALUES ($1, $2, $3, $4, clock_timestamp() + make_interval(secs => $5))
ON CONFLICT (process_manager, instance, name) DO UPDATE
SET id = EXCLUDED.id, due_at = EXCLUDED.due_at, created_at = now()"
            ),
            cancel_timer: format!(
                "DELETE FROM {timers} WHERE process_manager = $1 AND instance = $2 AND name = $3"
            ),
            cancel_all_timers: format!(
                "DELETE FROM {timers} WHERE process_manager = $1 AND instance = $2"
            ),
            delete_timer: format!("DELETE FROM {timers} WHERE id = $1"),
            due_timers: format!(
                "SELECT id, instance, name, due_at FROM {timers}
WHERE process_manager = $1 AND due_at <= clock_timestamp()
ORDER BY due_at, id LIMIT $2"
            ),
            next_due: format!(
                "SELECT EXTRACT(EPOCH FROM (min(due_at) - clock_timestamp()))::float8
FROM {timers} WHERE process_manager = $1"
            ),
            pending_timers: format!(
                "SELECT name FROM {timers} WHERE process_manager = $1 AND instance = $2 ORDER BY name"
            ),
            // Before the timer's row is deleted: a replayed timer's due time ($5 NULL)
            // comes from its row.
            record_firing: format!(
                "INSERT INTO {firings} (id, process_manager, instance, name, due_at)
VALUES ($1, $2, $3, $4, COALESCE($5, (SELECT due_at FROM {timers} WHERE id = $1), now()))"
            ),
            timer_firings: format!(
                "SELECT id, instance, name, due_at, fired_at FROM {firings}
WHERE process_manager = $1 AND ($2::text IS NULL OR instance = $2)
ORDER BY fired_at, due_at, id"
            ),
            prune_firings: format!(
                "DELETE FROM {firings}
WHERE process_manager = $1 AND fired_at < now() - make_interval(secs => $2)"
            ),
        }
    }
}

/// A process manager instance as stored: its state, and whether it completed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessInstance<T> {
    /// The state.
    pub state: T,
    /// Whether the instance completed (it ignores later events and has no timers).
    pub completed: bool,
}

/// A timer that fired, as `process_timer_firings` records it (a row per firing, written
/// in the transaction that deleted the timer and saved what its firing did): see
/// [`PgProcessManager::timer_firings`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TimerFiring {
    /// The timer's id (a timer set again under its name gets a new one): the key of the
    /// commands its firing issued, with their steps.
    pub id: Uuid,
    /// The instance.
    pub instance: String,
    /// The timer's name.
    pub name: String,
    /// When the timer was due.
    pub due_at: DateTime<Utc>,
    /// When its firing committed (the start of that transaction).
    pub fired_at: DateTime<Utc>,
}

/// What one batch of events read, before its commit.
enum Batch<T> {
    /// No event after the checkpoint.
    Empty { position: u64 },
    /// Events read and handled; the states to write.
    Handled {
        read: usize,
        handled: u64,
        position: u64,
        states: States<T>,
    },
}

/// The states a batch loaded, by instance.
type States<T> = HashMap<String, Loaded<T>>;

/// An instance's state as loaded in a step, and what to write back.
struct Loaded<T> {
    instance: ProcessInstance<T>,
    dirty: bool,
    /// The inputs handled in this step, in order (the replayed ones first): the
    /// `pending` marker written before an input's commands run.
    inputs: Vec<Input>,
    /// The timers replayed from the marker: their rows are deleted with the commit (and
    /// their firings recorded), and they do not fire again in this step.
    replayed: Vec<Settled>,
    /// The names of the timers this step's inputs set or cancelled: a due timer of such
    /// a name was cancelled or replaced before its turn, and does not fire.
    touched: HashSet<String>,
    /// In a timer step: the marker holds events of a crashed batch, which the next
    /// batch replays first; the instance's timers wait until then.
    blocked: bool,
}

/// A timer whose row a step's commit deletes, with whether it fired (then its firing is
/// recorded) or was dropped unfired (its instance had completed, or an earlier input of
/// the step cancelled or replaced it).
#[derive(Clone, Debug)]
struct Settled {
    id: Uuid,
    name: String,
    /// `None` for a replayed timer: its row has it.
    due_at: Option<DateTime<Utc>>,
    fired: bool,
}

/// An input of a process manager instance, as the `pending` marker records it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Input {
    /// The event at this global position.
    Event { position: u64 },
    /// The timer with this id and name.
    Timer { id: Uuid, name: String },
}

impl Input {
    fn to_json(&self) -> serde_json::Value {
        match self {
            Input::Event { position } => {
                serde_json::json!({ "kind": "event", "position": position })
            }
            Input::Timer { id, name } => {
                serde_json::json!({ "kind": "timer", "id": id.to_string(), "name": name })
            }
        }
    }

    fn from_json(value: &serde_json::Value) -> Option<Input> {
        match value.get("kind")?.as_str()? {
            "event" => Some(Input::Event {
                position: value.get("position")?.as_u64()?,
            }),
            "timer" => Some(Input::Timer {
                id: value.get("id")?.as_str()?.parse().ok()?,
                name: value.get("name")?.as_str()?.to_owned(),
            }),
            _ => None,
        }
    }
}

/// What a step is handling: its kind decides what a pending marker means for it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StepKind {
    Events,
    Timers,
}

/// Runs a [`ProcessManager`] durably over a [`PgEventStore`]: feeds it the events of its
/// event set's aggregate types in global order, executes its commands exactly once
/// through a [`Repository`], keeps its instances' states in `process_states` and its
/// timers in `process_timers`, and fires the timers when due, after restarts too.
///
/// # Exactly once, step by step
///
/// Each batch of events is one transaction that takes a transaction-scoped advisory lock
/// on the process manager's name (several runners of one process manager take turns;
/// the lock also serializes timers with events, so an instance's state is never updated
/// by two of them at once), reads the checkpoint (the `checkpoints` row named after the
/// process manager: do not give a projection the same name) and the events after it.
/// For each event of a running instance it calls
/// [`react`](ProcessManager::react) on the saved state and executes the commands, each
/// under [`CommandId::caused_by`](thalo::CommandId::caused_by)`(event, step)`, in their
/// own transactions. Only then does it write the new states, the timer changes and the
/// checkpoint, and commit. A crash before that commit loses the states and the
/// checkpoint, not the commands: the next runner reacts to the same events from the same
/// states, gets the same commands under the same keys, and the store replays them
/// instead of executing them again. The transaction writes nothing until the end, so it
/// does not hold back the read horizon of other readers while commands run.
///
/// Replaying the same input is not enough: the inputs of an instance must be replayed
/// in their original order, or a timer whose refund ran before a crash could be
/// overtaken by the instance's next event, which would deposit from a state that lost
/// the refund. So before an input's commands run, the runner records the instance's
/// inputs of this step in its `pending` column, committed on its own (one statement per
/// input with commands; the row is created with the default state if needed), and the
/// commit that saves the state clears it. A step that loads an instance with a pending
/// timer fires that timer again first, from the saved state, under its keys; a timer
/// step that finds pending events leaves the instance's timers due until the next batch
/// has replayed those events (it reads them again from the unchanged checkpoint).
///
/// Firing timers works the same way: under the same lock, the due timers are read, each
/// one's [`on_timer`](ProcessManager::on_timer) runs and its commands are executed under
/// keys derived from the timer's id, and the state, the timer's deletion, the record of
/// its firing (a row of `process_timer_firings`, keyed by the timer's id) and the new
/// timer changes commit together. A timer fires once, whichever runner and however many
/// restarts; a cancelled or replaced timer's row is gone and never fires, and within a
/// batch a timer fires only if no earlier firing cancelled or replaced it or completed
/// its instance. A second firing of one timer would violate the firing record's key and
/// roll back; [`timer_firings`](PgProcessManager::timer_firings) lists the firings, and
/// [`prune_timer_firings`](PgProcessManager::prune_timer_firings) deletes old ones.
///
/// ```no_run
/// # use thalo::{Action, Error, EventEnvelope, EventStore, ProcessManager};
/// # use thalo_postgres::{PgEventStore, PgProcessManager};
/// # #[derive(thalo::Aggregate, Clone, Debug, Default)]
/// # pub struct Order { #[identity] id: String }
/// # #[thalo::commands] impl Order { pub fn place(&self) -> Result<PlacedEvent, Error> { Ok(PlacedEvent {}) } }
/// # #[thalo::events] impl Order { pub fn placed(&mut self) {} }
/// # thalo::event_set! { /// Orders.
/// # pub enum Orders { Order(Order) } }
/// # struct Expiry;
/// # impl ProcessManager for Expiry {
/// #     type Event = Orders;
/// #     type State = ();
/// #     fn name(&self) -> &str { "expiry" }
/// #     fn correlate(&self, e: &EventEnvelope<Orders>) -> Option<String> { Some(e.aggregate_id.clone()) }
/// #     fn react<S: EventStore>(&self, _: &mut (), _: &EventEnvelope<Orders>) -> Result<Vec<Action<S>>, Error> { Ok(vec![]) }
/// # }
/// # async fn example(store: PgEventStore) -> Result<(), Error> {
/// let runner = PgProcessManager::new(store, Expiry);
/// runner.run(thalo::Shutdown::on_signal()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct PgProcessManager<P> {
    store: PgEventStore,
    repository: Repository<PgEventStore>,
    manager: P,
    sql: ProcessSql,
    /// Whether an aggregate type's events are read.
    includes: fn(&str) -> bool,
    batch_size: usize,
    poll_interval: Duration,
    /// Test hook: fail this many commits (after the commands ran).
    fail_before_commit: Option<Arc<AtomicU32>>,
}

impl<P: ProcessManager> PgProcessManager<P> {
    /// A runner of `manager` over `store`, whose commands go to `store` too.
    pub fn new(store: PgEventStore, manager: P) -> Self {
        let sql = ProcessSql::new(&store.inner.schema);
        PgProcessManager {
            repository: Repository::new(store.clone()),
            store,
            manager,
            sql,
            includes: <P::Event as EventSet>::includes,
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            fail_before_commit: None,
        }
    }

    /// Executes the commands through `repository` (with its cache and attempts) instead
    /// of a plain one over the store.
    #[must_use]
    pub fn with_repository(mut self, repository: Repository<PgEventStore>) -> Self {
        self.repository = repository;
        self
    }

    /// How many events (or due timers) to handle per transaction (default 100).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How long to wait for a notification before polling (default 1 s); due timers
    /// are fired on time regardless.
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Test hook: the next `failures` transactions fail just before their commit, after
    /// their commands ran, as a crash would. Not a public API.
    #[doc(hidden)]
    #[must_use]
    pub fn fail_before_commit(mut self, failures: Arc<AtomicU32>) -> Self {
        self.fail_before_commit = Some(failures);
        self
    }

    /// The process manager.
    pub fn manager(&self) -> &P {
        &self.manager
    }

    /// The stored instance `instance`, if it has seen an input (its state is the default
    /// while its first input is pending).
    ///
    /// # Errors
    ///
    /// [`Error::Store`], or [`Error::Serialization`] for a state that does not decode.
    pub async fn instance(
        &self,
        instance: &str,
    ) -> Result<Option<ProcessInstance<P::State>>, Error> {
        let mut conn = self.connection().await?;
        Ok(self
            .load_state(&mut conn, instance)
            .await?
            .map(|(instance, _)| instance))
    }

    /// The names of `instance`'s pending timers, sorted.
    ///
    /// # Errors
    ///
    /// [`Error::Store`].
    pub async fn timers(&self, instance: &str) -> Result<Vec<String>, Error> {
        let mut conn = self.connection().await?;
        sqlx::query_scalar(&self.sql.pending_timers)
            .bind(self.manager.name())
            .bind(instance)
            .fetch_all(&mut *conn)
            .await
            .map_err(store("reading process timers"))
    }

    /// The timers that fired, of `instance` or of every instance, in the order they
    /// fired (by `fired_at`, then `due_at`): a row of `process_timer_firings` each, written in the
    /// transaction that deleted the timer and saved what its firing did, so a timer
    /// appears at most once. Timers dropped unfired (cancelled, replaced, or cancelled by
    /// completion) do not appear.
    ///
    /// The table keeps every firing until
    /// [`prune_timer_firings`](Self::prune_timer_firings) deletes it.
    ///
    /// # Errors
    ///
    /// [`Error::Store`].
    pub async fn timer_firings(&self, instance: Option<&str>) -> Result<Vec<TimerFiring>, Error> {
        let mut conn = self.connection().await?;
        let rows = sqlx::query(&self.sql.timer_firings)
            .bind(self.manager.name())
            .bind(instance)
            .fetch_all(&mut *conn)
            .await
            .map_err(store("reading timer firings"))?;
        rows.iter()
            .map(|row| {
                Ok(TimerFiring {
                    id: row.try_get("id")?,
                    instance: row.try_get("instance")?,
                    name: row.try_get("name")?,
                    due_at: row.try_get("due_at")?,
                    fired_at: row.try_get("fired_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(store("reading a timer firing"))
    }

    /// Deletes this process manager's records of timers that fired more than
    /// `older_than` ago, and returns how many it deleted. The records are only for
    /// operators and tests ([`timer_firings`](Self::timer_firings)): the runner never
    /// reads them, and nothing else prunes them.
    ///
    /// # Errors
    ///
    /// [`Error::Store`].
    pub async fn prune_timer_firings(&self, older_than: Duration) -> Result<u64, Error> {
        let mut conn = self.connection().await?;
        let done = sqlx::query(&self.sql.prune_firings)
            .bind(self.manager.name())
            .bind(older_than.as_secs_f64())
            .execute(&mut *conn)
            .await
            .map_err(store("pruning timer firings"))?;
        Ok(done.rows_affected())
    }

    async fn connection(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, Error> {
        self.store
            .inner
            .pool
            .acquire()
            .await
            .map_err(store("acquiring a connection"))
    }

    async fn load_state(
        &self,
        conn: &mut PgConnection,
        instance: &str,
    ) -> Result<Option<(ProcessInstance<P::State>, Vec<Input>)>, Error> {
        let row = sqlx::query(&self.sql.load_state)
            .bind(self.manager.name())
            .bind(instance)
            .fetch_optional(conn)
            .await
            .map_err(store("loading a process state"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let state: serde_json::Value = row
            .try_get("state")
            .map_err(store("reading a process state"))?;
        let completed: bool = row
            .try_get("completed")
            .map_err(store("reading a process state"))?;
        let pending: Option<serde_json::Value> = row
            .try_get("pending")
            .map_err(store("reading a process state"))?;
        let pending = match pending {
            None => Vec::new(),
            Some(value) => value
                .as_array()
                .and_then(|inputs| inputs.iter().map(Input::from_json).collect())
                .ok_or_else(|| {
                    Error::config(format!(
                        "process `{}` instance `{instance}` has a malformed pending marker",
                        self.manager.name()
                    ))
                })?,
        };
        let state = serde_json::from_value(state).map_err(|e| {
            Error::serialization(
                format!(
                    "state of process `{}` instance `{instance}`",
                    self.manager.name()
                ),
                e,
            )
        })?;
        Ok(Some((ProcessInstance { state, completed }, pending)))
    }

    async fn begin_locked(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, Error> {
        let mut tx = self
            .store
            .inner
            .pool
            .begin()
            .await
            .map_err(store("beginning a process manager transaction"))?;
        sqlx::query(sql::ADVISORY_XACT_LOCK)
            .bind(format!(
                "{}{}",
                self.sql.lock_key_prefix,
                self.manager.name()
            ))
            .execute(&mut *tx)
            .await
            .map_err(store("locking the process manager"))?;
        Ok(tx)
    }

    /// The state of `instance` for this step: from `states` or the table.
    ///
    /// An instance first loaded with a pending marker had inputs whose commands may have
    /// run without their state being saved (a crash before the commit). To replay them
    /// in their original order, whatever this step is: the marker's timers are fired
    /// again first (their effects go to `writes`), from the saved state, under the same
    /// keys; the marker's events are replayed by the next event batch, which reads them
    /// again from the unchanged checkpoint before anything else of the instance, so a
    /// timer step leaves such an instance's timers due (`blocked`) until then.
    async fn state_for<'s>(
        &self,
        conn: &mut PgConnection,
        states: &'s mut States<P::State>,
        instance: &str,
        kind: StepKind,
        writes: &mut Vec<(String, Effects)>,
    ) -> Result<&'s mut Loaded<P::State>, Error> {
        if !states.contains_key(instance) {
            let (loaded, pending) = self.load_state(conn, instance).await?.unwrap_or((
                ProcessInstance {
                    state: P::State::default(),
                    completed: false,
                },
                Vec::new(),
            ));
            let mut loaded = Loaded {
                instance: loaded,
                dirty: false,
                inputs: Vec::new(),
                replayed: Vec::new(),
                touched: HashSet::new(),
                blocked: false,
            };
            let has_events = pending.iter().any(|i| matches!(i, Input::Event { .. }));
            if kind == StepKind::Timers && has_events {
                loaded.blocked = true;
            } else {
                // A marker's timers precede its events: a step handles either kind.
                for input in pending {
                    let Input::Timer { id, name } = input else {
                        break;
                    };
                    debug!(
                        process_manager = self.manager.name(),
                        instance,
                        timer = %name,
                        "replaying a timer interrupted before its commit"
                    );
                    let effects = self.fire(&mut loaded, instance, id, &name).await?;
                    let fired = effects.is_some();
                    if let Some(effects) = effects {
                        writes.push((instance.to_owned(), effects));
                    }
                    loaded.replayed.push(Settled {
                        id,
                        name,
                        due_at: None,
                        fired,
                    });
                    loaded.dirty = true;
                }
            }
            states.insert(instance.to_owned(), loaded);
        }
        states
            .get_mut(instance)
            .ok_or_else(|| Error::config("process state vanished from its cache"))
    }

    /// Records, in its own transaction, that `loaded`'s inputs are being handled: before
    /// the commands of the last one run, so that a crash leaves the marker behind.
    async fn mark_pending(&self, instance: &str, loaded: &Loaded<P::State>) -> Result<(), Error> {
        let default = serde_json::to_value(P::State::default()).map_err(|e| {
            Error::serialization(format!("state of process `{}`", self.manager.name()), e)
        })?;
        let pending = serde_json::Value::Array(loaded.inputs.iter().map(Input::to_json).collect());
        let mut conn = self.connection().await?;
        sqlx::query(&self.sql.mark_pending)
            .bind(self.manager.name())
            .bind(instance)
            .bind(default)
            .bind(pending)
            .execute(&mut *conn)
            .await
            .map_err(store("marking a process input as pending"))?;
        Ok(())
    }

    /// Hands `input`'s actions to the process manager's repository for `loaded`, marking
    /// the input pending first if it has commands; the new state goes to `loaded`.
    async fn apply(
        &self,
        loaded: &mut Loaded<P::State>,
        instance: &str,
        input: Input,
        cause: Uuid,
        mut state: P::State,
        actions: Vec<thalo::Action<PgEventStore>>,
    ) -> Result<Effects, Error> {
        loaded.inputs.push(input);
        if actions
            .iter()
            .any(|a| matches!(a, thalo::Action::Command(_)))
        {
            self.mark_pending(instance, loaded).await?;
        }
        let effects =
            execute_actions(&self.manager, &self.repository, &mut state, cause, actions).await?;
        loaded.instance.state = state;
        loaded.instance.completed = effects.completed;
        loaded.dirty = true;
        for change in &effects.timers {
            let (TimerChange::Set { name, .. } | TimerChange::Cancel { name }) = change;
            loaded.touched.insert(name.clone());
        }
        Ok(effects)
    }

    /// Fires the timer `id` (`name`) of `loaded`: its effects, `None` (not fired) for a
    /// completed instance or a timer that an earlier input of this step cancelled or
    /// replaced.
    async fn fire(
        &self,
        loaded: &mut Loaded<P::State>,
        instance: &str,
        id: Uuid,
        name: &str,
    ) -> Result<Option<Effects>, Error> {
        if loaded.instance.completed || loaded.touched.contains(name) {
            return Ok(None);
        }
        let mut state = loaded.instance.state.clone();
        let actions = self
            .manager
            .on_timer::<PgEventStore>(&mut state, name)
            .map_err(|e| handler_error(self.manager.name(), e))?;
        let input = Input::Timer {
            id,
            name: name.to_owned(),
        };
        self.apply(loaded, instance, input, id, state, actions)
            .await
            .map(Some)
    }

    /// Writes the timer changes of `instance` in order.
    async fn write_timers(
        &self,
        conn: &mut PgConnection,
        instance: &str,
        effects: &Effects,
    ) -> Result<(), Error> {
        let name = self.manager.name();
        for change in &effects.timers {
            match change {
                TimerChange::Set { name: timer, after } => {
                    sqlx::query(&self.sql.set_timer)
                        .bind(Uuid::new_v4())
                        .bind(name)
                        .bind(instance)
                        .bind(timer)
                        .bind(after.as_secs_f64())
                        .execute(&mut *conn)
                        .await
                        .map_err(store("setting a process timer"))?;
                }
                TimerChange::Cancel { name: timer } => {
                    sqlx::query(&self.sql.cancel_timer)
                        .bind(name)
                        .bind(instance)
                        .bind(timer)
                        .execute(&mut *conn)
                        .await
                        .map_err(store("cancelling a process timer"))?;
                }
            }
        }
        if effects.completed {
            sqlx::query(&self.sql.cancel_all_timers)
                .bind(name)
                .bind(instance)
                .execute(&mut *conn)
                .await
                .map_err(store("cancelling a completed process's timers"))?;
        }
        Ok(())
    }

    /// Writes the changed states, then checks the test hook and commits.
    async fn finish(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        states: States<P::State>,
    ) -> Result<(), Error> {
        // Sorted, so that concurrent writers (there are none under the lock, but an
        // operator may be) lock rows in one order.
        let mut dirty: Vec<_> = states.into_iter().filter(|(_, s)| s.dirty).collect();
        dirty.sort_by(|a, b| a.0.cmp(&b.0));
        for (instance, loaded) in dirty {
            let state = serde_json::to_value(&loaded.instance.state).map_err(|e| {
                Error::serialization(format!("state of process `{}`", self.manager.name()), e)
            })?;
            sqlx::query(&self.sql.save_state)
                .bind(self.manager.name())
                .bind(&instance)
                .bind(state)
                .bind(loaded.instance.completed)
                .execute(&mut *tx)
                .await
                .map_err(store("saving a process state"))?;
        }
        if let Some(failures) = &self.fail_before_commit {
            if failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let _ = tx.rollback().await;
                return Err(Error::store(
                    "committing a process manager step",
                    "injected failure before the commit",
                ));
            }
        }
        tx.commit()
            .await
            .map_err(store("committing a process manager step"))
    }

    /// Handles one batch of events in one transaction: how many events were read, how
    /// many handled, and the checkpoint after it.
    async fn step(&self) -> Result<(usize, u64, u64), Error> {
        let mut tx = self.begin_locked().await?;
        match self.step_in(&mut tx).await {
            Ok(Batch::Handled {
                read,
                handled,
                position,
                states,
            }) => {
                self.finish(tx, states).await?;
                Ok((read, handled, position))
            }
            Ok(Batch::Empty { position }) => {
                // End the transaction now rather than when `tx` is dropped: a dropped
                // transaction's ROLLBACK waits for its connection's next use, and until
                // then it holds the lock.
                tx.rollback()
                    .await
                    .map_err(store("ending an empty process manager transaction"))?;
                Ok((0, 0, position))
            }
            Err(err) => {
                let _ = tx.rollback().await;
                Err(err)
            }
        }
    }

    /// [`step`](Self::step)'s work in `tx`, up to the commit.
    async fn step_in(&self, tx: &mut PgConnection) -> Result<Batch<P::State>, Error> {
        let inner = &self.store.inner;
        let name = self.manager.name();
        let position = checkpoint::load(tx, &inner.sql, name).await?.unwrap_or(0);
        let batch = global::read_all(
            tx,
            &inner.sql,
            position,
            self.batch_size,
            inner.horizon_wait,
        )
        .await?;
        let Some(last) = batch.last().map(|e| e.position) else {
            return Ok(Batch::Empty { position });
        };
        let mut states = HashMap::new();
        let mut timer_writes = Vec::new();
        let mut handled = 0;
        for raw in batch.iter().filter(|e| (self.includes)(&e.aggregate_type)) {
            let envelope: EventEnvelope<P::Event> = raw.decode()?;
            let Some(instance) = self.manager.correlate(&envelope) else {
                continue;
            };
            let loaded = self
                .state_for(
                    tx,
                    &mut states,
                    &instance,
                    StepKind::Events,
                    &mut timer_writes,
                )
                .await?;
            if loaded.instance.completed {
                continue;
            }
            let mut state = loaded.instance.state.clone();
            let actions = self
                .manager
                .react::<PgEventStore>(&mut state, &envelope)
                .map_err(|e| handler_error(name, e))?;
            let input = Input::Event {
                position: raw.position,
            };
            let effects = self
                .apply(loaded, &instance, input, envelope.id, state, actions)
                .await?;
            timer_writes.push((instance, effects));
            handled += 1;
        }
        // All writes at the end: until then the transaction has no transaction id and
        // holds back no reader's horizon while the commands run.
        self.settle_replayed_timers(tx, &states).await?;
        for (instance, effects) in &timer_writes {
            self.write_timers(tx, instance, effects).await?;
        }
        checkpoint::save(tx, &inner.sql, name, last).await?;
        Ok(Batch::Handled {
            read: batch.len(),
            handled,
            position: last,
            states,
        })
    }

    /// Handles every event appended so far that the process manager has not seen, and
    /// returns how many it handed to the process manager.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] (also from a command), a decoding error, or the process
    /// manager's ([`Error::Handler`]). The failing batch is rolled back, its commands
    /// are replayed by the next attempt.
    pub async fn catch_up(&self) -> Result<u64, Error> {
        self.catch_up_from().await.map(|(handled, _)| handled)
    }

    async fn catch_up_from(&self) -> Result<(u64, u64), Error> {
        let mut total = 0;
        loop {
            let (read, handled, position) = self.step().await?;
            total += handled;
            if read < self.batch_size {
                return Ok((total, position));
            }
        }
    }

    /// Fires every timer that is due, in batches, earliest first, and returns how many
    /// fired.
    ///
    /// A timer fires only if it is still pending when its turn comes: one that an
    /// earlier firing of the same batch cancelled, replaced (set again under its name:
    /// the replacement fires at its own time) or cancelled by completing the instance
    /// does not fire, and a completed instance's timers never fire. Each firing is
    /// recorded in `process_timer_firings` ([`timer_firings`](Self::timer_firings)) in
    /// the transaction that deletes the timer and saves what it did.
    ///
    /// # Errors
    ///
    /// As [`catch_up`](PgProcessManager::catch_up); the failing batch's timers stay due.
    pub async fn fire_due_timers(&self) -> Result<u64, Error> {
        let mut total = 0;
        loop {
            let (settled, fired) = self.fire_batch().await?;
            total += fired;
            if settled < self.batch_size {
                return Ok(total);
            }
        }
    }

    /// One batch of due timers: how many of them it settled (fired, or dropped because
    /// cancelled, replaced or completed; not those left due behind pending events), and
    /// how many fired.
    async fn fire_batch(&self) -> Result<(usize, u64), Error> {
        let mut tx = self.begin_locked().await?;
        match self.fire_in(&mut tx).await {
            Ok(Some((settled, fired, states))) => {
                self.finish(tx, states).await?;
                debug!(process_manager = self.manager.name(), fired, "timers fired");
                Ok((settled, fired))
            }
            Ok(None) => {
                tx.rollback()
                    .await
                    .map_err(store("ending an empty timer transaction"))?;
                Ok((0, 0))
            }
            Err(err) => {
                let _ = tx.rollback().await;
                Err(err)
            }
        }
    }

    /// [`fire_batch`](Self::fire_batch)'s work in `tx`, up to the commit; `None` when no
    /// timer was due.
    async fn fire_in(
        &self,
        tx: &mut PgConnection,
    ) -> Result<Option<(usize, u64, States<P::State>)>, Error> {
        let name = self.manager.name();
        // No row locks: the advisory lock already makes firing exclusive per process
        // manager, and a row lock would give the transaction an id while the commands
        // run, holding back every reader's horizon.
        let rows = sqlx::query(&self.sql.due_timers)
            .bind(name)
            .bind(i64::try_from(self.batch_size).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(store("reading due process timers"))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut due = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: Uuid = row.try_get("id").map_err(store("reading a timer"))?;
            let instance: String = row.try_get("instance").map_err(store("reading a timer"))?;
            let timer: String = row.try_get("name").map_err(store("reading a timer"))?;
            let due_at: DateTime<Utc> = row.try_get("due_at").map_err(store("reading a timer"))?;
            due.push((id, instance, timer, due_at));
        }
        let mut states = HashMap::new();
        let mut writes = Vec::new();
        // The due timers whose rows this commit deletes, by instance.
        let mut settled: Vec<(String, Settled)> = Vec::with_capacity(due.len());
        let mut skipped = 0;
        for (id, instance, timer, due_at) in &due {
            let loaded = self
                .state_for(tx, &mut states, instance, StepKind::Timers, &mut writes)
                .await?;
            if loaded.blocked {
                continue;
            }
            // Replayed from the marker: fired (and recorded) already in this step.
            if loaded.replayed.iter().any(|r| r.id == *id) {
                skipped += 1;
                continue;
            }
            // Cancelled or replaced by an earlier input of this step: the timer changes
            // written below delete or replace its row.
            if !loaded.instance.completed && loaded.touched.contains(timer) {
                skipped += 1;
                continue;
            }
            // A completed instance's timer is deleted unfired.
            let effects = self.fire(loaded, instance, *id, timer).await?;
            let fired = effects.is_some();
            if let Some(effects) = effects {
                writes.push((instance.clone(), effects));
            }
            settled.push((
                instance.clone(),
                Settled {
                    id: *id,
                    name: timer.clone(),
                    due_at: Some(*due_at),
                    fired,
                },
            ));
        }
        if settled.is_empty() && states.values().all(|s| !s.dirty) {
            return Ok(None);
        }
        let mut fired = 0;
        for (instance, timer) in &settled {
            fired += u64::from(self.settle_timer(tx, instance, timer).await?);
        }
        fired += self.settle_replayed_timers(tx, &states).await?;
        for (instance, effects) in &writes {
            self.write_timers(tx, instance, effects).await?;
        }
        Ok(Some((settled.len() + skipped, fired, states)))
    }

    /// Records the firing of `timer` (if it fired) and deletes its row; whether it fired.
    async fn settle_timer(
        &self,
        tx: &mut PgConnection,
        instance: &str,
        timer: &Settled,
    ) -> Result<bool, Error> {
        if timer.fired {
            // A second firing of one timer violates the primary key and rolls back.
            sqlx::query(&self.sql.record_firing)
                .bind(timer.id)
                .bind(self.manager.name())
                .bind(instance)
                .bind(&timer.name)
                .bind(timer.due_at)
                .execute(&mut *tx)
                .await
                .map_err(store("recording a timer's firing"))?;
        }
        sqlx::query(&self.sql.delete_timer)
            .bind(timer.id)
            .execute(&mut *tx)
            .await
            .map_err(store("deleting a fired process timer"))?;
        Ok(timer.fired)
    }

    /// Settles the timers that `states` replayed from pending markers (their firings
    /// recorded, their rows deleted); how many fired.
    async fn settle_replayed_timers(
        &self,
        tx: &mut PgConnection,
        states: &States<P::State>,
    ) -> Result<u64, Error> {
        let mut fired = 0;
        for (instance, loaded) in states {
            for timer in &loaded.replayed {
                fired += u64::from(self.settle_timer(tx, instance, timer).await?);
            }
        }
        Ok(fired)
    }

    /// How long until the next timer is due (zero when one is), if there is one.
    async fn next_due(&self) -> Result<Option<Duration>, Error> {
        let mut conn = self.connection().await?;
        let seconds: Option<f64> = sqlx::query_scalar(&self.sql.next_due)
            .bind(self.manager.name())
            .fetch_one(&mut *conn)
            .await
            .map_err(store("reading the next process timer"))?;
        Ok(seconds.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)))
    }

    /// One round: catch up, fire due timers; the checkpoint and the time to wait.
    async fn round(&self) -> Result<(u64, Duration), Error> {
        let (_, position) = self.catch_up_from().await?;
        self.fire_due_timers().await?;
        let wait = match self.next_due().await? {
            Some(due) => due.min(self.poll_interval),
            None => self.poll_interval,
        };
        Ok((position, wait))
    }

    /// Handles events and fires timers until `shutdown` is triggered, then returns the
    /// process manager. A transaction in flight at shutdown is rolled back (and replayed
    /// by the next run, its commands under the same keys).
    ///
    /// Store errors (also a command's), and commands that kept conflicting, are logged
    /// and retried with exponential backoff, 100 ms doubling up to 30 s; the process
    /// manager's own errors, decoding errors and a reused command key (a `react` that is
    /// not deterministic) stop the runner.
    ///
    /// # Errors
    ///
    /// The process manager's error ([`Error::Handler`]) or a decoding error.
    pub async fn run(self, shutdown: impl Into<Shutdown>) -> Result<P, Error> {
        let shutdown = shutdown.into();
        let mut backoff = Backoff::new(self.poll_interval);
        loop {
            let round = tokio::select! {
                () = shutdown.triggered() => return Ok(self.manager),
                round = self.round() => round,
            };
            let (position, wait) = match round {
                Ok(next) => {
                    backoff.reset();
                    next
                }
                // A command that kept conflicting is retried like a store error.
                Err(err) if matches!(err, Error::Store { .. }) || err.is_conflict() => {
                    let delay = backoff.next_delay();
                    warn!(
                        process_manager = self.manager.name(),
                        error = %err,
                        retry_in = ?delay,
                        "process manager failed, retrying"
                    );
                    tokio::select! {
                        () = shutdown.triggered() => return Ok(self.manager),
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
                Err(err) => return Err(err),
            };
            tokio::select! {
                () = shutdown.triggered() => return Ok(self.manager),
                () = thalo::EventStore::wait_for_events(&self.store, position, wait) => {}
            }
        }
    }
}
