// The identity can be any field of any name and type: here a UUID-like newtype.
use std::fmt;

use thalo::{commands, events, Aggregate, Error};

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OrderId(u128);

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

#[derive(Aggregate, Clone, Debug)]
pub struct Order {
    placed: bool,
    #[identity]
    order_id: OrderId,
    lines: u32,
}

#[commands]
impl Order {
    pub fn place(&self, lines: u32) -> Result<PlacedEvent, Error> {
        Ok(PlacedEvent { lines })
    }
}

#[events]
impl Order {
    pub fn placed(&mut self, lines: u32) {
        self.placed = true;
        self.lines = lines;
    }
}

fn main() {
    let id = OrderId(0xfeed);
    let mut order = Order::new(id);
    assert_eq!(*order.id(), id);
    assert_eq!(order.id().to_string(), "0000000000000000000000000000feed");
    for event in order.handle(OrderCommand::Place { lines: 3 }).unwrap() {
        order.apply(event);
    }
    assert!(order.placed);
    assert_eq!(order.lines, 3);
}
