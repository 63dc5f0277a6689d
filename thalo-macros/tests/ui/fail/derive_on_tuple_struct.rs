use thalo::Aggregate;

#[derive(Aggregate)]
pub struct Account(#[identity] String, i64);

fn main() {}
