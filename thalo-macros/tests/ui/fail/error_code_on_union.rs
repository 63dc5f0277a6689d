// `#[derive(ErrorCode)]` needs an enum or a struct.
use thalo::ErrorCode;

#[derive(ErrorCode)]
pub union Bits {
    byte: u8,
    flag: bool,
}

fn main() {}
