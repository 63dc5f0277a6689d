//! `assert_apply_is_total` finds an `apply` that panics, and passes a total one.
#![cfg(feature = "proptest")]

use proptest::prelude::*;
use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Careless {
    #[identity]
    id: u64,
    value: i64,
}

#[commands]
impl Careless {
    pub fn add(&self, by: i64) -> Result<AddedEvent, Error> {
        Ok(AddedEvent { by })
    }
}

#[events]
impl Careless {
    pub fn added(&mut self, by: i64) {
        // Overflows (and panics in a debug build) for large values.
        self.value += by;
    }
}

#[test]
fn a_panicking_apply_is_found() {
    let found = std::panic::catch_unwind(|| {
        thalo_testing::assert_apply_is_total::<Careless>(
            1,
            any::<i64>().prop_map(|by| CarelessEvent::from(AddedEvent { by })),
            16,
        );
    });
    let message = found.expect_err("the overflow is found");
    let text = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        text.contains("`apply` of `careless` is not total"),
        "{text}"
    );
}

#[test]
fn a_total_apply_passes() {
    thalo_testing::assert_apply_is_total::<Careless>(
        1,
        (-1000_i64..1000).prop_map(|by| CarelessEvent::from(AddedEvent { by })),
        16,
    );
}
