//! `#[derive(Aggregate)]`: implements `AggregateType` and `Aggregate` by delegating
//! `handle` and `apply` to the enums that `#[commands]` and `#[events]` generate.

use heck::ToSnakeCase;
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::DeriveInput;

use crate::ast::{Aggregate, Names};
use crate::ctxt::Ctxt;
use crate::fallback;

/// Expands the derive; on invalid input, the errors plus stub impls (see [`fallback`]).
pub(crate) fn expand(input: &DeriveInput) -> TokenStream {
    let cx = Ctxt::new();
    let aggregate = Aggregate::from_syn(&cx, input);
    match cx.check() {
        Ok(()) => impls(&aggregate),
        Err(errors) => fallback::aggregate(&aggregate, &errors),
    }
}

/// The stable type name: `#[aggregate(name = "...")]`, or the struct's name in snake case.
pub(crate) fn type_name(aggregate: &Aggregate<'_>) -> String {
    match &aggregate.attrs.name {
        Some(name) => name.value(),
        None => aggregate.ident.unraw().to_string().to_snake_case(),
    }
}

/// `impl AggregateType`, shared with the fallback: it cannot fail.
pub(crate) fn aggregate_type_impl(aggregate: &Aggregate<'_>) -> TokenStream {
    let ident = aggregate.ident;
    let type_name = type_name(aggregate);
    quote! {
        #[automatically_derived]
        impl ::thalo::AggregateType for #ident {
            const TYPE: &'static str = #type_name;
        }
    }
}

fn impls(aggregate: &Aggregate<'_>) -> TokenStream {
    let ident = aggregate.ident;
    let Names { command, event, .. } = Names::new(ident);
    let Some(identity) = aggregate.identity else {
        // Unreachable: a missing identity was reported, and `expand` took the fallback.
        return TokenStream::new();
    };
    let id_ty = &identity.ty;
    let id_field = &identity.ident;

    let fields = aggregate.fields.iter().map(|field| {
        let name = &field.ident;
        if field.ident == identity.ident {
            quote!(#name: id)
        } else {
            // Spanned at the field's type: "`Balance: Default` is not satisfied" points at
            // the field that needs it, and the struct itself needs no `Default`.
            let default = quote_spanned!(field.ty.span()=> ::core::default::Default::default());
            quote!(#name: #default)
        }
    });

    let snapshot = aggregate.attrs.snapshot.as_ref().map(|key| {
        // Spanned at `snapshot`: that is what asks for `Serialize` and `Deserialize`.
        let encode = quote_spanned!(key.span()=> ::thalo::__private::encode_snapshot);
        let decode = quote_spanned!(key.span()=> ::thalo::__private::decode_snapshot);
        quote! {
            fn to_snapshot(
                &self,
            ) -> ::core::option::Option<::core::result::Result<::std::string::String, ::thalo::Error>> {
                ::core::option::Option::Some(#encode(
                    <Self as ::thalo::AggregateType>::TYPE,
                    self,
                ))
            }

            fn from_snapshot(snapshot: &str) -> ::core::result::Result<Self, ::thalo::Error> {
                #decode(<Self as ::thalo::AggregateType>::TYPE, snapshot)
            }
        }
    });

    let aggregate_type = aggregate_type_impl(aggregate);
    quote! {
        #aggregate_type

        #[automatically_derived]
        impl ::thalo::Aggregate for #ident {
            type Id = #id_ty;
            type Command = #command;
            type Event = #event;
            type Error = <#command as ::thalo::__private::CommandDispatch<#ident>>::Error;

            fn new(id: Self::Id) -> Self {
                Self {
                    #(#fields,)*
                }
            }

            fn id(&self) -> &Self::Id {
                &self.#id_field
            }

            fn handle(
                &self,
                command: Self::Command,
            ) -> ::core::result::Result<::std::vec::Vec<Self::Event>, Self::Error> {
                <Self::Command as ::thalo::__private::CommandDispatch<Self>>::dispatch(command, self)
            }

            fn apply(&mut self, event: Self::Event) {
                <Self::Event as ::thalo::__private::EventDispatch<Self>>::apply_to(event, self);
            }

            // Keeps the error's `ErrorCode`, if its type has one: the impl names the
            // concrete aggregate, so the probe can tell (see `RejectProbe`).
            fn reject(error: Self::Error) -> ::thalo::Error {
                #[allow(unused_imports)]
                use ::thalo::__private::{RejectCoded as _, RejectPlain as _};
                (&::thalo::__private::RejectProbe::<Self>::new()).reject_error(error)
            }

            #snapshot
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
    fn derives_both_traits() {
        let out = expand_str(parse_quote! {
            pub struct BankAccount {
                #[identity]
                account_number: String,
                balance: f64,
            }
        });
        assert!(out.contains(
            "impl :: thalo :: AggregateType for BankAccount { const TYPE : & 'static str = \"bank_account\" ; }"
        ));
        assert!(out.contains("impl :: thalo :: Aggregate for BankAccount"));
        assert!(out.contains("type Id = String ;"));
        assert!(out.contains("type Command = BankAccountCommand ;"));
        assert!(out.contains("type Event = BankAccountEvent ;"));
        assert!(out.contains(
            "Self { account_number : id , balance : :: core :: default :: Default :: default () , }"
        ));
        assert!(out.contains("& self . account_number"));
        assert!(out.contains(
            "(& :: thalo :: __private :: RejectProbe :: < Self > :: new ()) . reject_error (error)"
        ), "{out}");
        assert!(!out.contains("to_snapshot"));
        assert!(!out.contains("compile_error"));
    }

    #[test]
    fn name_and_snapshot() {
        let out = expand_str(parse_quote! {
            #[aggregate(name = "account", snapshot)]
            pub struct BankAccount {
                #[identity]
                id: u64,
            }
        });
        assert!(out.contains("const TYPE : & 'static str = \"account\" ;"));
        assert!(out.contains(":: thalo :: __private :: encode_snapshot"));
        assert!(out.contains(":: thalo :: __private :: decode_snapshot"));
    }

    #[test]
    fn errors_come_with_stubs() {
        let out = expand_str(parse_quote! {
            #[aggregate(nme = "x")]
            pub struct BankAccount {
                id: u64,
            }
        });
        assert_eq!(out.matches("compile_error").count(), 2, "{out}");
        assert!(out.contains("impl :: thalo :: Aggregate for BankAccount"));
        assert!(out.contains("type Id = :: std :: string :: String ;"));
    }

    #[test]
    fn generic_structs_get_no_stubs() {
        let out = expand_str(parse_quote! {
            pub struct BankAccount<T> {
                #[identity]
                id: T,
            }
        });
        assert_eq!(out.matches("compile_error").count(), 1, "{out}");
        assert!(!out.contains("impl"));
    }
}
