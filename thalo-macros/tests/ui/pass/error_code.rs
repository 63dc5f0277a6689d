//! `#[derive(ErrorCode)]`, and an aggregate whose commands return a coded error: the
//! rejection carries the code, with no code of the user's beyond the derive. Warning-free
//! and documented, in a public module.
#![deny(
    warnings,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms
)]

/// A public module, so `missing_docs` checks what the macros generate.
pub mod library {
    use thalo::{commands, events, Aggregate, ErrorCode};

    /// Why a loan is refused.
    #[derive(Debug, PartialEq, thiserror::Error, ErrorCode)]
    pub enum LoanError {
        /// Pinned to its old name.
        #[error("the member is suspended")]
        #[code("MEMBER_SUSPENDED")]
        Suspended,
        /// A tuple variant.
        #[error("{0} books are too many")]
        TooManyBooks(u32),
        /// A struct variant, with an acronym.
        #[error("the ISBN {isbn} is unknown")]
        UnknownISBN {
            /// The ISBN.
            isbn: String,
        },
    }

    /// A struct: one code.
    #[derive(Debug, PartialEq, thiserror::Error, ErrorCode)]
    #[error("the library is closed")]
    pub struct LibraryClosed;

    /// A generic struct with a pinned code.
    #[derive(Debug, thiserror::Error, ErrorCode)]
    #[error("late by {0:?}")]
    #[code("LATE")]
    pub struct Late<T: std::fmt::Debug>(pub T)
    where
        T: Send;

    /// No values at all.
    #[derive(Debug, ErrorCode)]
    pub enum Never {}

    /// A member of the library.
    #[derive(Aggregate, Clone, Debug, Default)]
    pub struct Member {
        #[identity]
        id: String,
        suspended: bool,
        books: u32,
    }

    #[commands]
    impl Member {
        /// Suspends the member.
        pub fn suspend(&self) -> Result<SuspendedEvent, LoanError> {
            Ok(SuspendedEvent {})
        }

        /// Borrows books.
        pub fn borrow(&self, books: u32) -> Result<BorrowedEvent, LoanError> {
            if self.suspended {
                return Err(LoanError::Suspended);
            }
            if self.books + books > 3 {
                return Err(LoanError::TooManyBooks(self.books + books));
            }
            Ok(BorrowedEvent { books })
        }
    }

    #[events]
    impl Member {
        /// The member was suspended.
        pub fn suspended(&mut self) {
            self.suspended = true;
        }

        /// Books were borrowed.
        pub fn borrowed(&mut self, books: u32) {
            self.books += books;
        }
    }
}

fn main() {
    use library::{Late, LibraryClosed, LoanError, Member, MemberCommand};
    use thalo::{Aggregate, ErrorCode};

    assert_eq!(LoanError::Suspended.code(), "MEMBER_SUSPENDED");
    assert_eq!(LoanError::TooManyBooks(4).code(), "TOO_MANY_BOOKS");
    let unknown = LoanError::UnknownISBN {
        isbn: "0".to_owned(),
    };
    assert_eq!(unknown.code(), "UNKNOWN_ISBN");
    assert_eq!(LibraryClosed.code(), "LIBRARY_CLOSED");
    assert_eq!(Late(3u8).code(), "LATE");
    assert!(matches!(
        LibraryClosed.code(),
        std::borrow::Cow::Borrowed(_)
    ));

    let mut member = Member::new("m".to_owned());
    for event in member.handle(MemberCommand::Borrow { books: 3 }).unwrap() {
        member.apply(event);
    }
    let err = member
        .handle(MemberCommand::Borrow { books: 1 })
        .unwrap_err();
    assert_eq!(err, LoanError::TooManyBooks(4));
    let err: thalo::Error = Member::reject(err);
    assert_eq!(err.code(), Some("TOO_MANY_BOOKS"));
    assert_eq!(
        err.downcast_domain::<LoanError>(),
        Some(&LoanError::TooManyBooks(4))
    );
    assert_eq!(err.to_string(), "command rejected: 4 books are too many");
}
