//! Spans for generated code that should be blamed on the user's tokens.
//!
//! Type-level checks (is this a `Result`? the same error type? an event?) happen in the
//! compiler, on generated code. Giving that code the span of the user's return type makes
//! the compiler's message, and any follow-up error, point at the return type instead of
//! at `#[commands]`; identical diagnostics at one span are also reported once.
//!
//! Respanned tokens resolve names as the user's own tokens do (like tokens of a plain
//! `quote!`), so generated locals that must not clash with the user's names keep a
//! `Span::mixed_site()` and are not respanned.

use proc_macro2::{Span, TokenTree};
use quote::ToTokens;
use syn::{GenericArgument, PathArguments, Type};

/// `quote!` with every token of the template placed over `$target`: the first starts
/// where `$target` starts, the others end where it ends, so a diagnostic on the generated
/// code underlines the whole of `$target` (a type of several tokens, such as
/// `Vec<OpenedEvent>`). Interpolated tokens keep their own spans, as with
/// `quote_spanned!`. The template must not start with an interpolation.
macro_rules! quote_at {
    ($target:expr => $first:tt $($rest:tt)*) => {{
        let (start, end) = $crate::span::range($target);
        let first = ::quote::quote_spanned!(start=> $first);
        let rest = ::quote::quote_spanned!(end=> $($rest)*);
        ::quote::quote!(#first #rest)
    }};
}

pub(crate) use quote_at;

/// Where to point an error about a command's events: `OpenedEvent` in
/// `Result<OpenedEvent, Error>` (also right for `thalo::Result<OpenedEvent>`), or the
/// whole return type when it has no generic arguments (an alias).
///
/// Only locations depend on this; the checks themselves go through the type system.
pub(crate) fn ok_part(output: &Type) -> &Type {
    generic_types(output).next().unwrap_or(output)
}

/// Where to point an error about a command's error type: `Error` in
/// `Result<OpenedEvent, Error>`, or the whole return type when it does not spell out two
/// generic arguments (`thalo::Result<OpenedEvent>`, an alias).
pub(crate) fn error_part(output: &Type) -> &Type {
    let types: Vec<&Type> = generic_types(output).collect();
    match types.as_slice() {
        [_, error] => error,
        _ => output,
    }
}

fn generic_types(ty: &Type) -> impl Iterator<Item = &Type> {
    let arguments = match ty {
        Type::Path(path) => path.path.segments.last().map(|segment| &segment.arguments),
        _ => None,
    };
    let args = match arguments {
        Some(PathArguments::AngleBracketed(args)) => Some(&args.args),
        _ => None,
    };
    args.into_iter().flatten().filter_map(|arg| match arg {
        GenericArgument::Type(ty) => Some(ty),
        _ => None,
    })
}

/// The span of the first and of the last token of `target`.
pub(crate) fn range(target: &impl ToTokens) -> (Span, Span) {
    let mut tokens = target.to_token_stream().into_iter();
    let start = tokens
        .next()
        .map_or_else(Span::call_site, |first| first.span());
    let end = match tokens.last() {
        Some(TokenTree::Group(group)) => group.span_close(),
        Some(last) => last.span(),
        None => start,
    };
    (start, end)
}

#[cfg(test)]
mod tests {
    use syn::parse_quote;

    use super::*;

    #[test]
    fn parts_of_a_return_type() {
        let full: Type = parse_quote!(Result<Vec<OpenedEvent>, MyError>);
        let ok = ok_part(&full);
        let error = error_part(&full);
        assert_eq!(quote::quote!(#ok).to_string(), "Vec < OpenedEvent >");
        assert_eq!(quote::quote!(#error).to_string(), "MyError");

        let alias: Type = parse_quote!(thalo::Result<OpenedEvent>);
        let ok = ok_part(&alias);
        assert_eq!(quote::quote!(#ok).to_string(), "OpenedEvent");
        assert_eq!(error_part(&alias), &alias);

        let bare: Type = parse_quote!(CommandResult);
        assert_eq!(ok_part(&bare), &bare);
        assert_eq!(error_part(&bare), &bare);
    }

    #[test]
    fn quote_at_keeps_the_tokens() {
        let target: Type = parse_quote!(Vec<u8>);
        let output: Type = parse_quote!(Result<A, B>);
        let tokens = quote_at!(&target => ::core::result::Result::map(#output, f));
        assert_eq!(
            tokens.to_string(),
            ":: core :: result :: Result :: map (Result < A , B > , f)"
        );
    }
}
