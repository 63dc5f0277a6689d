// A `pub` accessor inside `#[commands]` is one error, on its return type, saying where it
// belongs (and nothing from inside Thalo about lifetimes).
use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Member {
    #[identity]
    id: String,
    loans: Vec<String>,
}

#[commands]
impl Member {
    pub fn loans(&self) -> &[String] {
        &self.loans
    }

    pub fn borrow(&self, book: String) -> Result<BorrowedEvent, Error> {
        Ok(BorrowedEvent { book })
    }
}

#[events]
impl Member {
    pub fn borrowed(&mut self, book: String) {
        self.loans.push(book);
    }
}

fn main() {
    let _ = Member::default().loans();
}
