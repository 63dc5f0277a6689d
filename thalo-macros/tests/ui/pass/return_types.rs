// Command methods may return an event struct, the event enum, or a `Vec` or `Option` of
// either; a command without arguments is a unit variant; helpers are left alone.
use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Cart {
    #[identity]
    id: u64,
    items: Vec<String>,
    checked_out: bool,
}

#[commands]
impl Cart {
    pub fn add_items(&self, items: Vec<String>) -> Result<Vec<ItemAddedEvent>, Error> {
        self.ensure_open()?;
        Ok(items
            .into_iter()
            .map(|item| ItemAddedEvent { item })
            .collect())
    }

    pub fn add_item_once(&self, item: String) -> Result<Option<ItemAddedEvent>, Error> {
        self.ensure_open()?;
        Ok((!self.items.contains(&item)).then_some(ItemAddedEvent { item }))
    }

    pub fn check_out(&self) -> Result<CartEvent, Error> {
        self.ensure_open()?;
        Ok(CheckedOutEvent {}.into())
    }

    pub fn clear(&self) -> thalo::Result<Vec<CartEvent>> {
        Ok(self
            .items
            .iter()
            .map(|item| CartEvent::ItemRemoved(ItemRemovedEvent { item: item.clone() }))
            .collect())
    }

    pub fn maybe_check_out(&self, really: bool) -> Result<Option<CartEvent>, Error> {
        Ok(really.then(|| CartEvent::CheckedOut(CheckedOutEvent {})))
    }

    fn ensure_open(&self) -> Result<(), Error> {
        if self.checked_out {
            return Err(Error::invariant_code("CHECKED_OUT"));
        }
        Ok(())
    }
}

#[events]
impl Cart {
    pub fn item_added(&mut self, item: String) {
        self.items.push(item);
    }

    pub fn item_removed(&mut self, item: String) {
        self.items.retain(|i| *i != item);
    }

    pub fn checked_out(&mut self) {
        self.checked_out = true;
    }
}

fn execute(cart: &mut Cart, command: CartCommand) -> Result<usize, Error> {
    let events = cart.handle(command)?;
    let n = events.len();
    for event in events {
        cart.apply(event);
    }
    Ok(n)
}

fn main() {
    let mut cart = Cart::new(1);
    let items = vec!["tea".to_owned(), "milk".to_owned()];
    assert_eq!(
        execute(&mut cart, CartCommand::AddItems { items }).unwrap(),
        2
    );
    let item = "tea".to_owned();
    assert_eq!(
        execute(&mut cart, CartCommand::AddItemOnce { item }).unwrap(),
        0
    );
    let item = "jam".to_owned();
    assert_eq!(
        execute(&mut cart, CartCommand::AddItemOnce { item }).unwrap(),
        1
    );
    assert_eq!(
        execute(&mut cart, CartCommand::MaybeCheckOut { really: false }).unwrap(),
        0
    );
    assert_eq!(execute(&mut cart, CartCommand::Clear).unwrap(), 3);
    assert!(cart.items.is_empty());
    assert_eq!(execute(&mut cart, CartCommand::CheckOut).unwrap(), 1);
    assert!(cart.checked_out);
    let err = execute(&mut cart, CartCommand::CheckOut).unwrap_err();
    assert_eq!(err.code(), Some("CHECKED_OUT"));
    assert_eq!(*cart.id(), 1);
}
