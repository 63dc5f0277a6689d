//! `#[derive(ErrorCode)]`: a stable, machine-readable code per value of a domain error.

use proc_macro2::TokenStream;
use quote::quote;
use syn::DeriveInput;

use crate::ast::{Code, Codes, ErrorCode};
use crate::ctxt::Ctxt;
use crate::fallback;

/// Expands the derive; on invalid input, the errors plus a stub impl (see [`fallback`]).
pub(crate) fn expand(input: &DeriveInput) -> TokenStream {
    let cx = Ctxt::new();
    let model = ErrorCode::from_syn(&cx, input);
    match cx.check() {
        Ok(()) => impl_error_code(&model),
        Err(errors) => fallback::error_code(input, &errors),
    }
}

fn impl_error_code(model: &ErrorCode<'_>) -> TokenStream {
    let code = |code: &Code| match code {
        // The literal as written, so that it keeps its span.
        Code::Given(lit) => quote!(#lit),
        Code::Derived(name) => quote!(#name),
    };
    let body = match &model.codes {
        Codes::Struct(one) => {
            let one = code(one);
            quote!(::std::borrow::Cow::Borrowed(#one))
        }
        // `*self`: a reference to an enum without variants matches with no arms. Not
        // wrapped in `Cow::Borrowed`, which would be unreachable code.
        Codes::Enum(variants) if variants.is_empty() => quote!(match *self {}),
        Codes::Enum(variants) => {
            let arms = variants.iter().map(|(variant, one)| {
                let one = code(one);
                quote!(Self::#variant { .. } => #one,)
            });
            quote! {
                ::std::borrow::Cow::Borrowed(match *self {
                    #(#arms)*
                })
            }
        }
        // Reported: `expand` took the fallback.
        Codes::Union => return TokenStream::new(),
    };
    let input = model.input;
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    quote! {
        #[automatically_derived]
        impl #impl_generics ::thalo::ErrorCode for #ident #ty_generics #where_clause {
            fn code(&self) -> ::std::borrow::Cow<'static, str> {
                #body
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use syn::parse_quote;

    use super::*;

    fn expand_str(input: DeriveInput) -> String {
        expand(&input).to_string()
    }

    #[test]
    fn enum_codes_default_to_screaming_snake_case() {
        let out = expand_str(parse_quote! {
            pub enum LoanError {
                #[error("suspended")]
                #[code("MEMBER_SUSPENDED")]
                Suspended,
                TooManyBooks(u32),
                HTTPTimeout { after: u64 },
                r#Loop,
            }
        });
        assert!(!out.contains("compile_error"), "{out}");
        assert!(
            out.contains("impl :: thalo :: ErrorCode for LoanError"),
            "{out}"
        );
        assert!(
            out.contains(
                "match * self { Self :: Suspended { .. } => \"MEMBER_SUSPENDED\" , \
             Self :: TooManyBooks { .. } => \"TOO_MANY_BOOKS\" , \
             Self :: HTTPTimeout { .. } => \"HTTP_TIMEOUT\" , \
             Self :: r#Loop { .. } => \"LOOP\" , }"
            ),
            "{out}"
        );
    }

    #[test]
    fn struct_codes_and_generics() {
        let out = expand_str(parse_quote! {
            pub struct AccountFrozen<T: Clone> where T: Send {
                since: T,
            }
        });
        assert!(
            out.contains(
                "impl < T : Clone > :: thalo :: ErrorCode for AccountFrozen < T > where T : Send"
            ),
            "{out}"
        );
        assert!(
            out.contains(":: std :: borrow :: Cow :: Borrowed (\"ACCOUNT_FROZEN\")"),
            "{out}"
        );

        let out = expand_str(parse_quote! {
            #[code("FROZEN")]
            pub struct AccountFrozen;
        });
        assert!(out.contains("Cow :: Borrowed (\"FROZEN\")"), "{out}");
    }

    #[test]
    fn empty_enums_match_nothing() {
        let out = expand_str(parse_quote!(
            pub enum Never {}
        ));
        assert!(out.contains("match * self { }"), "{out}");
    }

    #[test]
    fn misuse_is_reported_with_a_stub() {
        let out = expand_str(parse_quote! {
            #[code("ALL")]
            pub enum LoanError {
                Suspended {
                    #[code("FIELD")]
                    since: u64,
                },
                #[code]
                Other,
            }
        });
        assert_eq!(out.matches("compile_error").count(), 3, "{out}");
        assert!(
            out.contains("impl :: thalo :: ErrorCode for LoanError"),
            "{out}"
        );
        assert!(out.contains("unreachable"), "{out}");

        let out = expand_str(parse_quote! {
            pub union Bits {
                a: u8,
            }
        });
        assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        assert!(out.contains("`#[derive(ErrorCode)]` needs an enum or a struct, found a union"));
    }
}
