use thalo::{commands, events};

pub struct Account;

pub trait Open {
    fn open(&self);
}

#[commands]
impl Open for Account {
    fn open(&self) {}
}

pub struct Wrapper<T>(T);

#[events]
impl<T> Wrapper<T> {
    pub fn opened(&mut self) {}
}

#[commands]
pub struct NotAnImpl;

fn main() {
    let _ = NotAnImpl;
}
