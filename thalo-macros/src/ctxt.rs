//! An accumulator for the user's mistakes, so that one expansion reports all of them.

use std::cell::RefCell;
use std::fmt::Display;
use std::thread;

use quote::ToTokens;

/// Collects the errors found while checking one macro input.
///
/// Every check reports into the context and goes on, so the user sees all their mistakes
/// at once instead of fixing them one compile at a time. [`Ctxt::check`] must be called
/// before the context is dropped, as with serde_derive's `Ctxt`: a context dropped with
/// unreported errors would lose them silently.
pub(crate) struct Ctxt {
    // `None` once `check` has run.
    errors: RefCell<Option<Vec<syn::Error>>>,
}

impl Ctxt {
    pub(crate) fn new() -> Self {
        Ctxt {
            errors: RefCell::new(Some(Vec::new())),
        }
    }

    /// Reports `message` at the span of `tokens` (from their first to their last token).
    pub(crate) fn error_spanned_by<T: ToTokens, M: Display>(&self, tokens: T, message: M) {
        self.syn_error(syn::Error::new_spanned(tokens.into_token_stream(), message));
    }

    /// Reports an error produced by `syn`, e.g. while parsing an attribute.
    pub(crate) fn syn_error(&self, error: syn::Error) {
        self.errors
            .borrow_mut()
            .as_mut()
            .expect("Ctxt used after check")
            .push(error);
    }

    /// Consumes the context: `Ok` when nothing was reported, otherwise every error,
    /// combined into one `syn::Error` that expands to one `compile_error!` per error.
    pub(crate) fn check(self) -> syn::Result<()> {
        let mut errors = self
            .errors
            .borrow_mut()
            .take()
            .expect("Ctxt checked twice")
            .into_iter();
        let Some(mut combined) = errors.next() else {
            return Ok(());
        };
        for rest in errors {
            combined.combine(rest);
        }
        Err(combined)
    }
}

impl Drop for Ctxt {
    fn drop(&mut self) {
        // A bug in this crate, never the user's mistake: fail loudly in tests.
        if !thread::panicking() && self.errors.borrow().is_some() {
            panic!("forgot to check for errors");
        }
    }
}

#[cfg(test)]
mod tests {
    use proc_macro2::Span;
    use quote::quote;

    use super::*;

    #[test]
    fn no_errors_is_ok() {
        let cx = Ctxt::new();
        assert!(cx.check().is_ok());
    }

    #[test]
    fn all_errors_are_combined() {
        let cx = Ctxt::new();
        cx.error_spanned_by(quote!(a), "first");
        cx.syn_error(syn::Error::new(Span::call_site(), "second"));
        let err = cx.check().unwrap_err();
        let messages: Vec<String> = err.into_iter().map(|e| e.to_string()).collect();
        assert_eq!(messages, ["first", "second"]);
    }
}
