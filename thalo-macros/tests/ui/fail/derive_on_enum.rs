use thalo::Aggregate;

#[derive(Aggregate)]
pub enum Account {
    Open { id: String },
    Closed,
}

fn main() {}
