use thalo::Aggregate;

#[derive(Aggregate)]
pub struct Account<Id> {
    #[identity]
    id: Id,
    cents: i64,
}

fn main() {}
