//! The write side: a library member, who joins, borrows books and returns them.

use std::fmt;

use thalo::{commands, events, Aggregate};

/// How many books a member may have on loan at once.
pub const MAX_LOANS: usize = 3;

/// A member's identity: their library card number. Streams are keyed by its `Display`
/// form, so it must not change for a member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberId(pub String);

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why the library refuses a command. Each variant has a stable code for programs
/// (`thalo::ErrorCode`): its name in `SCREAMING_SNAKE_CASE`, or `#[code("...")]`.
#[derive(Debug, PartialEq, thiserror::Error, thalo::ErrorCode)]
pub enum LoanError {
    /// `NOT_A_MEMBER`
    #[error("not a member of the library")]
    NotAMember,
    /// `ALREADY_A_MEMBER`
    #[error("already a member of the library")]
    AlreadyAMember,
    /// `LOAN_LIMIT_REACHED`: the code is pinned, so renaming the variant keeps it.
    #[error("a member may borrow at most {limit} books")]
    #[code("LOAN_LIMIT_REACHED")]
    TooManyBooks { limit: usize },
    /// `ALREADY_BORROWED`
    #[error("`{book}` is already on loan to this member")]
    AlreadyBorrowed { book: String },
    /// `NOT_BORROWED`
    #[error("`{book}` is not on loan to this member")]
    NotBorrowed { book: String },
}

/// A library member: the consistency boundary for their loans.
#[derive(Aggregate, Clone, Debug, Default)]
pub struct Member {
    #[identity]
    id: MemberId,
    name: Option<String>,
    loans: Vec<String>,
}

#[commands]
impl Member {
    /// Joins the library.
    pub fn join(&self, name: String) -> Result<JoinedEvent, LoanError> {
        if self.name.is_some() {
            return Err(LoanError::AlreadyAMember);
        }
        Ok(JoinedEvent { name })
    }

    /// Borrows a book.
    pub fn borrow(&self, book: String) -> Result<BorrowedEvent, LoanError> {
        if self.name.is_none() {
            return Err(LoanError::NotAMember);
        }
        if self.loans.contains(&book) {
            return Err(LoanError::AlreadyBorrowed { book });
        }
        if self.loans.len() >= MAX_LOANS {
            return Err(LoanError::TooManyBooks { limit: MAX_LOANS });
        }
        Ok(BorrowedEvent { book })
    }

    /// Brings a book back.
    pub fn return_book(&self, book: String) -> Result<ReturnedEvent, LoanError> {
        if !self.loans.contains(&book) {
            return Err(LoanError::NotBorrowed { book });
        }
        Ok(ReturnedEvent { book })
    }
}

#[events]
impl Member {
    /// The member joined.
    pub fn joined(&mut self, name: String) {
        self.name = Some(name);
    }

    /// The member borrowed a book.
    pub fn borrowed(&mut self, book: String) {
        self.loans.push(book);
    }

    /// The member brought a book back.
    pub fn returned(&mut self, book: String) {
        self.loans.retain(|loan| *loan != book);
    }
}

#[cfg(test)]
mod tests {
    use thalo_testing::AggregateTest;

    use super::*;

    /// Ada, who has joined and borrowed `books`.
    fn ada_with(books: &[&str]) -> AggregateTest<Member> {
        AggregateTest::new(MemberId("card-1".into()))
            .given([JoinedEvent { name: "Ada".into() }])
            .given(books.iter().map(|&book| borrowed(book)))
    }

    fn borrow(book: &str) -> MemberCommand {
        MemberCommand::Borrow { book: book.into() }
    }

    fn borrowed(book: &str) -> BorrowedEvent {
        BorrowedEvent { book: book.into() }
    }

    #[test]
    fn a_member_borrows_a_book() {
        ada_with(&[])
            .when(borrow("Dune"))
            .then_events([borrowed("Dune")]);
    }

    #[test]
    fn only_members_borrow() {
        AggregateTest::<Member>::new(MemberId("card-2".into()))
            .when(borrow("Dune"))
            .then_error_code("NOT_A_MEMBER");
    }

    #[test]
    fn a_member_borrows_at_most_three_books() {
        ada_with(&["Dune", "Emma", "Ulysses"])
            .when(borrow("Middlemarch"))
            .then_domain_error(LoanError::TooManyBooks { limit: 3 });
    }

    #[test]
    fn the_loan_limit_has_a_pinned_code() {
        ada_with(&["Dune", "Emma", "Ulysses"])
            .when(borrow("Middlemarch"))
            .then_error_code("LOAN_LIMIT_REACHED");
    }

    #[test]
    fn a_member_returns_a_book() {
        ada_with(&["Dune"])
            .when(MemberCommand::ReturnBook {
                book: "Dune".into(),
            })
            .then_events([ReturnedEvent {
                book: "Dune".into(),
            }])
            .then_state(|member| assert!(member.loans.is_empty()));
    }

    #[test]
    fn only_borrowed_books_come_back() {
        ada_with(&[])
            .when(MemberCommand::ReturnBook {
                book: "Dune".into(),
            })
            .then_domain_error(LoanError::NotBorrowed {
                book: "Dune".into(),
            });
    }
}
