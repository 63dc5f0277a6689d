// An accessor after the commands, returning a tuple: the same one error.
use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Member {
    #[identity]
    id: String,
    loans: Vec<String>,
}

#[commands]
impl Member {
    pub fn borrow(&self, book: String) -> Result<BorrowedEvent, Error> {
        Ok(BorrowedEvent { book })
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.loans.len(), 0)
    }
}

#[events]
impl Member {
    pub fn borrowed(&mut self, book: String) {
        self.loans.push(book);
    }
}

fn main() {}
