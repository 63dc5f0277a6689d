// Every malformed or misplaced `#[code]` is reported, all at once, on its own tokens.
use thalo::ErrorCode;

#[derive(Debug, ErrorCode)]
#[code("LOAN")]
pub enum LoanError {
    #[code]
    Suspended,
    #[code = "LATE"]
    Late,
    #[code(TOO_MANY)]
    TooMany,
    #[code("")]
    Empty,
    #[code("NOT FOUND")]
    NotFound,
    #[code("LOST")]
    #[code("MISSING")]
    Lost,
    Damaged {
        #[code("PAGE")]
        page: u32,
    },
}

#[derive(Debug, ErrorCode)]
#[code("CLOSED", "SHUT")]
pub struct Closed;

fn main() {
    // The impls are still there: no "`ErrorCode` is not implemented" below.
    let _ = thalo::ErrorCode::code(&Closed);
    let _ = thalo::ErrorCode::code(&LoanError::Lost);
}
