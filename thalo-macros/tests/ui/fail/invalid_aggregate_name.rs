use thalo::Aggregate;

#[derive(Aggregate)]
#[aggregate(name = "Bank Account")]
pub struct Account {
    #[identity]
    id: String,
}

#[derive(Aggregate)]
#[aggregate(name = "")]
pub struct Other {
    #[identity]
    id: String,
}

fn main() {}
