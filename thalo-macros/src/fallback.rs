//! What the macros emit next to their errors.
//!
//! An invalid `#[commands]` impl still defines `BankAccountCommand`, an invalid
//! `#[events]` impl still defines the event structs and `BankAccountEvent`, an invalid
//! `#[derive(Aggregate)]` still implements `Aggregate`, each with whatever could be
//! parsed, and an invalid `#[derive(ErrorCode)]` still implements `ErrorCode`. The user then sees the errors that matter, not a cascade of "cannot find
//! type `BankAccountCommand`" from every use (thiserror's `fallback.rs` does the same).
//! The stub bodies are never run: the crate does not compile.

use std::collections::HashSet;

use proc_macro2::{Span, TokenStream};
use quote::{quote, ToTokens};
use syn::DeriveInput;

use crate::aggregate::aggregate_type_impl;
use crate::ast::{Aggregate, Impl, Kind, Method, Names};
use crate::commands::command_enum;
use crate::events::event_types;

/// `#[commands]` or `#[events]` on something that is not an impl block: the error, and
/// the item unchanged so that it still exists.
pub(crate) fn not_an_impl(kind: Kind, item: TokenStream) -> TokenStream {
    let error = syn::Error::new(
        Span::call_site(),
        format_args!(
            "`#[{}]` goes on an impl block of the aggregate, such as `impl BankAccount`",
            kind.macro_name()
        ),
    )
    .to_compile_error();
    quote! {
        #error
        #item
    }
}

pub(crate) fn aggregate(aggregate: &Aggregate<'_>, errors: &syn::Error) -> TokenStream {
    let errors = errors.to_compile_error();
    if aggregate.generic {
        // A stub could not name the type without its generics.
        return errors;
    }
    let ident = aggregate.ident;
    let Names { command, event, .. } = Names::new(ident);
    let id_ty = match aggregate.identity {
        Some(field) => field.ty.to_token_stream(),
        None => quote!(::std::string::String),
    };
    let aggregate_type = aggregate_type_impl(aggregate);
    quote! {
        #errors

        #aggregate_type

        #[automatically_derived]
        impl ::thalo::Aggregate for #ident {
            type Id = #id_ty;
            type Command = #command;
            type Event = #event;
            type Error = <#command as ::thalo::__private::CommandDispatch<#ident>>::Error;

            fn new(_: Self::Id) -> Self {
                ::core::unreachable!()
            }

            fn id(&self) -> &Self::Id {
                ::core::unreachable!()
            }

            fn handle(
                &self,
                _: Self::Command,
            ) -> ::core::result::Result<::std::vec::Vec<Self::Event>, Self::Error> {
                ::core::unreachable!()
            }

            fn apply(&mut self, _: Self::Event) {
                ::core::unreachable!()
            }
        }
    }
}

/// `#[derive(ErrorCode)]`: the impl, so that uses of the code (`Error::coded`) add no
/// "`ErrorCode` is not implemented".
pub(crate) fn error_code(input: &DeriveInput, errors: &syn::Error) -> TokenStream {
    let errors = errors.to_compile_error();
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    quote! {
        #errors

        #[automatically_derived]
        impl #impl_generics ::thalo::ErrorCode for #ident #ty_generics #where_clause {
            fn code(&self) -> ::std::borrow::Cow<'static, str> {
                ::core::unreachable!()
            }
        }
    }
}

pub(crate) fn commands(input: &Impl<'_>, errors: &syn::Error) -> TokenStream {
    let errors = errors.to_compile_error();
    let Some(names) = &input.names else {
        return errors;
    };
    let Names { command, event, .. } = names;
    let self_ty = input.self_ty;
    // Variants could name the impl's generic parameters, which the enum does not have.
    let methods = if input.generic {
        Vec::new()
    } else {
        unique(&input.methods, |method| method.variant.to_string())
    };
    let command_enum = command_enum(input, names, methods);
    if input.generic {
        return quote! {
            #errors
            #command_enum
        };
    }
    quote! {
        #errors

        #command_enum

        #[automatically_derived]
        impl ::thalo::__private::CommandDispatch<#self_ty> for #command {
            type Event = #event;
            type Error = ::thalo::Error;

            fn dispatch(
                self,
                _: &#self_ty,
            ) -> ::core::result::Result<::std::vec::Vec<#event>, Self::Error> {
                ::core::unreachable!()
            }
        }
    }
}

pub(crate) fn events(input: &Impl<'_>, errors: &syn::Error) -> TokenStream {
    let errors = errors.to_compile_error();
    let Some(names) = &input.names else {
        return errors;
    };
    let event = &names.event;
    let self_ty = input.self_ty;
    let methods = if input.generic {
        Vec::new()
    } else {
        unique(&input.methods, |method| method.event_struct().to_string())
    };
    let types = event_types(input, names, &methods);
    let dispatch = (!input.generic).then(|| {
        quote! {
            #[automatically_derived]
            impl ::thalo::__private::EventDispatch<#self_ty> for #event {
                fn apply_to(self, _: &mut #self_ty) {
                    ::core::unreachable!()
                }
            }
        }
    });
    quote! {
        #errors

        #types

        #[automatically_derived]
        impl ::thalo::Event for #event {
            fn event_type(&self) -> &'static str {
                ::core::unreachable!()
            }

            fn encode(&self) -> ::core::result::Result<::std::string::String, ::thalo::Error> {
                ::core::unreachable!()
            }

            fn decode(
                _: &str,
                _: u16,
                _: &str,
            ) -> ::core::result::Result<Self, ::thalo::Error> {
                ::core::unreachable!()
            }

            fn event_types() -> &'static [&'static str] {
                &[]
            }
        }

        #dispatch
    }
}

/// The methods whose `key` (variant or struct name) is not taken by an earlier one: a
/// duplicate was reported, and emitting it twice would add a "defined multiple times".
fn unique<'m, 'a>(
    methods: &'m [Method<'a>],
    key: impl Fn(&Method<'a>) -> String,
) -> Vec<&'m Method<'a>> {
    let mut seen = HashSet::new();
    methods
        .iter()
        .filter(|method| seen.insert(key(method)))
        .collect()
}
