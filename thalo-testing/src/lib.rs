//! Testing tools for Thalo.
//!
//! - [`AggregateTest`]: given past events, when a command, then expect events, an error
//!   code or a state. Failures print a diff of expected and actual events.
//! - [`ProcessManagerTest`]: given past events of a process manager instance, when an
//!   event or a timer, then expect commands (by their text), timers, completion or a
//!   state; a command's rejection is declared with
//!   [`rejecting`](ProcessManagerTest::rejecting).
//! - [`conformance`]: the behavioural suite every [`EventStore`](thalo::EventStore)
//!   implementation must pass, run against the in-memory store here and against
//!   Postgres in `thalo-postgres`.
//!
//! ```
//! use thalo::{commands, events, Aggregate, Error};
//! use thalo_testing::AggregateTest;
//!
//! #[derive(Aggregate, Clone, Debug, Default)]
//! pub struct Light {
//!     #[identity]
//!     id: u32,
//!     on: bool,
//! }
//!
//! #[commands]
//! impl Light {
//!     pub fn switch_on(&self) -> Result<Option<SwitchedOnEvent>, Error> {
//!         Ok((!self.on).then_some(SwitchedOnEvent {}))
//!     }
//!     pub fn break_bulb(&self) -> Result<Vec<LightEvent>, Error> {
//!         Err(Error::invariant_code("UNBREAKABLE"))
//!     }
//! }
//!
//! #[events]
//! impl Light {
//!     pub fn switched_on(&mut self) {
//!         self.on = true;
//!     }
//! }
//!
//! AggregateTest::<Light>::new(1)
//!     .when(LightCommand::SwitchOn)
//!     .then_events([SwitchedOnEvent {}])
//!     .then_state(|light| assert!(light.on));
//!
//! AggregateTest::<Light>::new(1)
//!     .given([SwitchedOnEvent {}])
//!     .when(LightCommand::SwitchOn)
//!     .then_no_events();
//!
//! AggregateTest::<Light>::new(1)
//!     .when(LightCommand::BreakBulb)
//!     .then_error_code("UNBREAKABLE");
//! ```
//!
//! With the `proptest` feature, [`assert_apply_is_total`] replays generated event
//! sequences to check that `apply` never panics: validation belongs in commands, and an
//! `apply` that panics on a stored event makes the aggregate unloadable.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod aggregate_test;
pub mod conformance;
mod process_test;
#[cfg(feature = "proptest")]
mod total;

pub use aggregate_test::{AggregateTest, Outcome};
pub use process_test::{ProcessManagerTest, ProcessOutcome};
#[cfg(feature = "proptest")]
pub use total::assert_apply_is_total;
