//! The checked models the expansions work from.
//!
//! Building a model checks everything that can be checked on one item and reports each
//! problem to the [`Ctxt`] on the offending token. The model keeps the original `syn`
//! nodes, so the expansions can point later compiler errors at the user's tokens, and it
//! keeps whatever could be parsed even when there were errors, so the fallback can still
//! emit the generated types.

use heck::{ToShoutySnakeCase, ToUpperCamelCase};
use proc_macro2::TokenStream;
use syn::ext::IdentExt;
use syn::{
    Attribute, Data, DeriveInput, Field, Fields, FnArg, Ident, ImplItem, ImplItemFn, ItemImpl,
    LitStr, Pat, Receiver, ReturnType, Type, Visibility,
};

use crate::attr;
use crate::ctxt::Ctxt;

/// A struct with `#[derive(Aggregate)]`.
pub(crate) struct Aggregate<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) attrs: attr::Aggregate,
    /// The named fields, in order; empty for anything but a struct with named fields.
    pub(crate) fields: Vec<&'a Field>,
    /// The field marked `#[identity]`, when exactly one is.
    pub(crate) identity: Option<&'a Field>,
    /// Whether the struct has generics, which the derive does not support. The fallback
    /// emits no stubs then: they could not name the type.
    pub(crate) generic: bool,
}

impl<'a> Aggregate<'a> {
    pub(crate) fn from_syn(cx: &Ctxt, input: &'a DeriveInput) -> Self {
        let attrs = attr::aggregate(cx, &input.attrs);

        let generic = !input.generics.params.is_empty() || input.generics.where_clause.is_some();
        if generic {
            let (generics, where_clause) = (&input.generics, &input.generics.where_clause);
            cx.error_spanned_by(
                quote::quote!(#generics #where_clause),
                "`#[derive(Aggregate)]` does not support generic structs",
            );
        }

        let mut fields = Vec::new();
        match &input.data {
            Data::Struct(data) => match &data.fields {
                Fields::Named(named) => fields.extend(named.named.iter()),
                Fields::Unnamed(unnamed) => cx.error_spanned_by(
                    unnamed,
                    "`#[derive(Aggregate)]` needs a struct with named fields, found a tuple struct",
                ),
                Fields::Unit => cx.error_spanned_by(
                    &input.ident,
                    "`#[derive(Aggregate)]` needs a struct with named fields, found a unit struct",
                ),
            },
            Data::Enum(data) => cx.error_spanned_by(
                data.enum_token,
                "`#[derive(Aggregate)]` needs a struct with named fields, found an enum",
            ),
            Data::Union(data) => cx.error_spanned_by(
                data.union_token,
                "`#[derive(Aggregate)]` needs a struct with named fields, found a union",
            ),
        }

        let mut identity = None;
        let mut marked = 0usize;
        for field in &fields {
            for attr in &field.attrs {
                if !attr::is_identity(cx, attr) {
                    continue;
                }
                marked += 1;
                if identity.is_none() {
                    identity = Some(*field);
                } else {
                    cx.error_spanned_by(
                        attr,
                        "duplicate `#[identity]`: `#[derive(Aggregate)]` needs exactly one field marked `#[identity]`",
                    );
                }
            }
        }
        if marked == 0
            && matches!(&input.data, Data::Struct(data) if matches!(data.fields, Fields::Named(_)))
        {
            cx.error_spanned_by(
                &input.ident,
                "`#[derive(Aggregate)]` needs exactly one field marked `#[identity]`",
            );
        }
        if marked > 1 {
            identity = None;
        }

        Aggregate {
            ident: &input.ident,
            attrs,
            fields,
            identity,
            generic,
        }
    }
}

/// A type with `#[derive(ErrorCode)]`.
pub(crate) struct ErrorCode<'a> {
    pub(crate) input: &'a DeriveInput,
    pub(crate) codes: Codes<'a>,
}

/// Where the codes of an `ErrorCode` type come from.
pub(crate) enum Codes<'a> {
    /// A struct's one code: `#[code("...")]` on the struct, or its name.
    Struct(Code),
    /// An enum's code per variant.
    Enum(Vec<(&'a Ident, Code)>),
    /// A union, which was reported.
    Union,
}

/// One code, as written in `#[code("...")]` or derived from a name.
pub(crate) enum Code {
    Given(LitStr),
    /// The `SCREAMING_SNAKE_CASE` of the type's or variant's name.
    Derived(String),
}

impl Code {
    fn new(cx: &Ctxt, attrs: &[Attribute], name: &Ident) -> Self {
        match attr::code(cx, attrs) {
            Some(lit) => Code::Given(lit),
            None => Code::Derived(name.unraw().to_string().to_shouty_snake_case()),
        }
    }
}

impl<'a> ErrorCode<'a> {
    pub(crate) fn from_syn(cx: &Ctxt, input: &'a DeriveInput) -> Self {
        let codes = match &input.data {
            Data::Struct(data) => {
                let code = Code::new(cx, &input.attrs, &input.ident);
                no_code_on_fields(cx, &data.fields);
                Codes::Struct(code)
            }
            Data::Enum(data) => {
                for attr in input.attrs.iter().filter(|attr| attr::is_code_attr(attr)) {
                    cx.error_spanned_by(
                        attr,
                        "`#[code]` goes on each variant of an enum, not on the enum",
                    );
                }
                let codes = data
                    .variants
                    .iter()
                    .map(|variant| {
                        no_code_on_fields(cx, &variant.fields);
                        (
                            &variant.ident,
                            Code::new(cx, &variant.attrs, &variant.ident),
                        )
                    })
                    .collect();
                Codes::Enum(codes)
            }
            Data::Union(data) => {
                cx.error_spanned_by(
                    data.union_token,
                    "`#[derive(ErrorCode)]` needs an enum or a struct, found a union",
                );
                Codes::Union
            }
        };
        ErrorCode { input, codes }
    }
}

fn no_code_on_fields(cx: &Ctxt, fields: &Fields) {
    let attrs = fields.iter().flat_map(|field| &field.attrs);
    for attr in attrs.filter(|attr| attr::is_code_attr(attr)) {
        cx.error_spanned_by(
            attr,
            "`#[code]` goes on the struct or on an enum's variants, not on fields",
        );
    }
}

/// Which macro an impl block is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Commands,
    Events,
}

impl Kind {
    /// The attribute's name, as in `#[commands]`.
    pub(crate) fn macro_name(self) -> &'static str {
        match self {
            Kind::Commands => "commands",
            Kind::Events => "events",
        }
    }

    /// What a method of this impl is, as in "command methods take ...".
    fn noun(self) -> &'static str {
        match self {
            Kind::Commands => "command",
            Kind::Events => "event",
        }
    }
}

/// An impl block with `#[commands]` or `#[events]`.
pub(crate) struct Impl<'a> {
    /// The aggregate type as written after `impl`.
    pub(crate) self_ty: &'a Type,
    /// The names derived from the aggregate's name; `None` when the self type is not a
    /// plain named type, which was reported.
    pub(crate) names: Option<Names>,
    /// Whether the impl has generics (reported). The generated types cannot name them, so
    /// the fallback emits them without variants.
    pub(crate) generic: bool,
    /// The `pub` methods: the commands or the events.
    pub(crate) methods: Vec<Method<'a>>,
}

/// Names of the types the macros generate for one aggregate.
pub(crate) struct Names {
    /// `BankAccountCommand`.
    pub(crate) command: Ident,
    /// `BankAccountEvent`.
    pub(crate) event: Ident,
}

impl Names {
    pub(crate) fn new(aggregate: &Ident) -> Self {
        // Spanned at the aggregate's name in `impl BankAccount`, so a missing `#[events]`
        // ("cannot find type `BankAccountEvent`") points there.
        let name = aggregate.unraw();
        Names {
            command: Ident::new(&format!("{name}Command"), aggregate.span()),
            event: Ident::new(&format!("{name}Event"), aggregate.span()),
        }
    }
}

/// A `pub` method of a `#[commands]` or `#[events]` impl.
pub(crate) struct Method<'a> {
    pub(crate) ident: &'a Ident,
    /// The method's doc comments, forwarded to the generated variant or struct.
    pub(crate) docs: Vec<&'a Attribute>,
    /// The arguments after `self` that could be used (plain identifiers).
    pub(crate) args: Vec<Arg<'a>>,
    /// The return type, for commands.
    pub(crate) output: Option<&'a Type>,
    /// `#[event(...)]`, for events.
    pub(crate) event: attr::Event,
    /// PascalCase of the method name: the command variant, or the event variant and the
    /// event struct's name without `Event`.
    pub(crate) variant: Ident,
}

impl Method<'_> {
    /// The event struct's name, e.g. `AccountOpenedEvent`.
    pub(crate) fn event_struct(&self) -> Ident {
        Ident::new(&format!("{}Event", self.variant), self.variant.span())
    }

    /// The stable event type name: `#[event(name = "...")]`, or the variant's name.
    pub(crate) fn event_name(&self) -> String {
        match &self.event.name {
            Some(name) => name.value(),
            None => self.variant.to_string(),
        }
    }
}

/// An argument of a command or event method: a field of the generated variant or struct.
pub(crate) struct Arg<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) ty: &'a Type,
    /// Attributes moved to the generated field, e.g. `#[serde(default)]` or `///` docs.
    pub(crate) attrs: Vec<&'a Attribute>,
}

impl<'a> Impl<'a> {
    /// The aggregate's path for docs, e.g. `BankAccount` or `crate::bank::BankAccount`.
    pub(crate) fn aggregate_path(&self) -> String {
        match self.self_ty {
            Type::Path(path) => {
                let segments: Vec<String> = path
                    .path
                    .segments
                    .iter()
                    .map(|segment| segment.ident.to_string())
                    .collect();
                let leading = if path.path.leading_colon.is_some() {
                    "::"
                } else {
                    ""
                };
                format!("{leading}{}", segments.join("::"))
            }
            other => quote::quote!(#other).to_string(),
        }
    }

    pub(crate) fn from_syn(cx: &Ctxt, kind: Kind, item: &'a ItemImpl) -> Self {
        let name = kind.macro_name();
        if let Some((bang, path, for_token)) = &item.trait_ {
            cx.error_spanned_by(
                quote::quote!(#bang #path #for_token),
                format_args!("`#[{name}]` goes on an inherent impl block such as `impl BankAccount`, not on a trait impl"),
            );
        }
        let generic = !item.generics.params.is_empty() || item.generics.where_clause.is_some();
        if generic {
            let (generics, where_clause) = (&item.generics, &item.generics.where_clause);
            cx.error_spanned_by(
                quote::quote!(#generics #where_clause),
                format_args!("`#[{name}]` does not support generic impl blocks"),
            );
        }

        let names = match &*item.self_ty {
            Type::Path(path) if path.qself.is_none() => match path.path.segments.last() {
                Some(last) if last.arguments.is_empty() => Some(Names::new(&last.ident)),
                Some(last) => {
                    if !generic {
                        cx.error_spanned_by(
                            &last.arguments,
                            format_args!("`#[{name}]` does not support generic aggregates"),
                        );
                    }
                    None
                }
                None => None,
            },
            other => {
                cx.error_spanned_by(
                    other,
                    format_args!(
                        "`#[{name}]` needs an impl of a named struct, such as `impl BankAccount`"
                    ),
                );
                None
            }
        };

        let mut methods = Vec::new();
        for impl_item in &item.items {
            let ImplItem::Fn(func) = impl_item else {
                continue;
            };
            if matches!(func.vis, Visibility::Inherited) {
                // Private methods are helpers, left alone.
                if kind == Kind::Events {
                    for attr in func.attrs.iter().filter(|attr| attr::is_event_attr(attr)) {
                        cx.error_spanned_by(
                            attr,
                            "`#[event]` goes on `pub` event methods; methods that are not `pub` are helpers",
                        );
                    }
                }
                continue;
            }
            methods.push(Method::from_syn(cx, kind, func));
        }
        // A trait impl was reported above; its methods cannot be `pub`.
        if methods.is_empty() && item.trait_.is_none() {
            let noun = kind.noun();
            cx.error_spanned_by(
                &item.self_ty,
                format_args!(
                    "`#[{name}]` found no `pub` {noun} methods; {noun}s are the `pub` methods of the impl block"
                ),
            );
        }

        Impl {
            self_ty: &item.self_ty,
            names,
            generic,
            methods,
        }
    }
}

impl<'a> Method<'a> {
    fn from_syn(cx: &Ctxt, kind: Kind, func: &'a ImplItemFn) -> Self {
        let noun = kind.noun();
        let sig = &func.sig;

        // Reported in source order: the attributes above the signature first.
        let event = match kind {
            Kind::Events => attr::event(cx, &func.attrs),
            Kind::Commands => attr::Event::default(),
        };
        check_receiver(cx, kind, func);
        if let Some(asyncness) = &sig.asyncness {
            cx.error_spanned_by(asyncness, format_args!("{noun} methods cannot be `async`"));
        }
        if let Some(unsafety) = &sig.unsafety {
            cx.error_spanned_by(unsafety, format_args!("{noun} methods cannot be `unsafe`"));
        }
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            let (generics, where_clause) = (&sig.generics, &sig.generics.where_clause);
            cx.error_spanned_by(
                quote::quote!(#generics #where_clause),
                format_args!(
                    "{noun} methods cannot be generic: the generated {noun} type needs concrete field types"
                ),
            );
        }

        let output = match (&sig.output, kind) {
            (ReturnType::Type(_, ty), Kind::Commands) if never_a_result(ty) => {
                // Most likely an accessor (`-> &[String]`) that is not meant as a
                // command. Reported here, once: as a command it would only reach the
                // compiler's errors about lifetimes in the generated code.
                cx.error_spanned_by(ty, not_a_command(&sig.ident));
                None
            }
            (ReturnType::Type(_, ty), Kind::Commands) => Some(&**ty),
            (ReturnType::Default, Kind::Commands) => {
                cx.error_spanned_by(&sig.ident, not_a_command(&sig.ident));
                None
            }
            (ReturnType::Type(..), Kind::Events) => {
                cx.error_spanned_by(
                    &sig.output,
                    "event methods must not return a value; events cannot fail",
                );
                None
            }
            (ReturnType::Default, Kind::Events) => None,
        };

        let args = sig
            .inputs
            .iter()
            .filter_map(|input| match input {
                FnArg::Typed(typed) => Arg::from_syn(cx, kind, typed),
                FnArg::Receiver(_) => None,
            })
            .collect();

        let ident = &sig.ident;
        let variant = Ident::new(
            &ident.unraw().to_string().to_upper_camel_case(),
            ident.span(),
        );

        Method {
            ident,
            docs: func
                .attrs
                .iter()
                .filter(|attr| attr::is_doc(attr))
                .collect(),
            args,
            output,
            event,
            variant,
        }
    }
}

impl<'a> Arg<'a> {
    fn from_syn(cx: &Ctxt, kind: Kind, typed: &'a syn::PatType) -> Option<Self> {
        let noun = kind.noun();
        for attr in typed.attrs.iter().filter(|attr| attr::is_cfg(attr)) {
            cx.error_spanned_by(
                attr,
                format_args!("`#[cfg]` is not supported on {noun} arguments"),
            );
        }
        // Reported, and left out of the generated type: as a field it would only add the
        // compiler's own errors about lifetimes or `impl Trait`.
        match &*typed.ty {
            Type::Reference(reference) => {
                cx.error_spanned_by(
                    reference,
                    format_args!(
                        "{noun} arguments must be owned types: the generated {noun} type cannot hold a reference"
                    ),
                );
                return None;
            }
            Type::ImplTrait(impl_trait) => {
                cx.error_spanned_by(
                    impl_trait,
                    format_args!(
                        "{noun} arguments cannot be `impl Trait`: the generated {noun} type needs concrete field types"
                    ),
                );
                return None;
            }
            _ => {}
        }
        match &*typed.pat {
            Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => Some(Arg {
                ident: &pat.ident,
                ty: &typed.ty,
                attrs: typed
                    .attrs
                    .iter()
                    .filter(|attr| moves_to_field(attr))
                    .collect(),
            }),
            other => {
                cx.error_spanned_by(
                    other,
                    format_args!(
                        "{noun} arguments must be plain identifiers: each one becomes a named field"
                    ),
                );
                None
            }
        }
    }
}

/// Whether an attribute of a command or event argument moves to the generated field
/// (`#[serde(...)]`, docs, ...) rather than staying on the argument (lints) or being
/// rejected (`#[cfg]`).
fn moves_to_field(attr: &Attribute) -> bool {
    !attr::is_lint(attr) && !attr::is_cfg(attr)
}

/// The message for a `pub` method of `#[commands]` that cannot be a command.
fn not_a_command(ident: &Ident) -> String {
    format!(
        "`{ident}` does not return a `Result`, but every `pub` method in `#[commands]` is a \
         command: return `Result<SomeEvent, Error>`, or, if `{ident}` is not a command, move \
         it to a plain `impl` block (or make it private)"
    )
}

/// Whether a return type can be seen, from its syntax alone, not to be a `Result`:
/// references, slices, tuples (`()` too), arrays, pointers, `impl Trait`, `dyn Trait`,
/// function pointers, `!`. A path such as `Balance` may be an alias of a `Result`
/// (`thalo::Result<E>` is one): those go through the type system's check.
fn never_a_result(ty: &Type) -> bool {
    match ty {
        Type::Paren(paren) => never_a_result(&paren.elem),
        Type::Group(group) => never_a_result(&group.elem),
        Type::Reference(_)
        | Type::Slice(_)
        | Type::Tuple(_)
        | Type::Array(_)
        | Type::Ptr(_)
        | Type::ImplTrait(_)
        | Type::TraitObject(_)
        | Type::BareFn(_)
        | Type::Never(_) => true,
        _ => false,
    }
}

/// How a method takes `self`.
enum Taken {
    Ref,
    RefMut,
    Value,
    Other,
}

fn taken(receiver: &Receiver) -> Taken {
    // syn fills in `ty` for the shorthand forms too: `&self` is `&Self`, `self` is `Self`.
    match &*receiver.ty {
        Type::Reference(reference) if is_self(&reference.elem) => {
            if reference.mutability.is_some() {
                Taken::RefMut
            } else {
                Taken::Ref
            }
        }
        ty if is_self(ty) => Taken::Value,
        _ => Taken::Other,
    }
}

fn is_self(ty: &Type) -> bool {
    matches!(ty, Type::Path(path) if path.qself.is_none() && path.path.is_ident("Self"))
}

fn check_receiver(cx: &Ctxt, kind: Kind, func: &ImplItemFn) {
    let (noun, expected) = match kind {
        Kind::Commands => ("command", "`&self`"),
        Kind::Events => ("event", "`&mut self`"),
    };
    let Some(FnArg::Receiver(receiver)) = func.sig.inputs.first() else {
        cx.error_spanned_by(
            &func.sig.ident,
            format_args!("{noun} methods take {expected}, found no `self` argument"),
        );
        return;
    };
    let found = match (taken(receiver), kind) {
        (Taken::Ref, Kind::Commands) | (Taken::RefMut, Kind::Events) => return,
        (Taken::Ref, Kind::Events) => "`&self`".to_owned(),
        (Taken::RefMut, Kind::Commands) => "`&mut self`".to_owned(),
        (Taken::Value, _) => "`self`".to_owned(),
        (Taken::Other, _) => {
            let ty = &receiver.ty;
            format!("`self: {}`", quote::quote!(#ty))
        }
    };
    cx.error_spanned_by(
        receiver,
        format_args!("{noun} methods take {expected}, found {found}"),
    );
}

/// The method's docs, or `default` when it has none (generated public items need docs
/// for `missing_docs`).
pub(crate) fn docs_or(docs: &[&Attribute], default: &str) -> TokenStream {
    if docs.is_empty() {
        quote::quote!(#[doc = #default])
    } else {
        quote::quote!(#(#docs)*)
    }
}

/// `default` as the doc of a generated field whose forwarded attributes have no docs.
pub(crate) fn field_docs_or(forwarded: &[&Attribute], default: &str) -> TokenStream {
    if forwarded.iter().any(|attr| attr::is_doc(attr)) {
        TokenStream::new()
    } else {
        quote::quote!(#[doc = #default])
    }
}

/// The impl block as the user wrote it, minus what the macros consume: `#[event]` on
/// methods and the attributes that move from arguments to generated fields.
pub(crate) fn strip_impl(kind: Kind, item: &ItemImpl) -> ItemImpl {
    let mut item = item.clone();
    for impl_item in &mut item.items {
        let ImplItem::Fn(func) = impl_item else {
            continue;
        };
        if kind == Kind::Events {
            func.attrs.retain(|attr| !attr::is_event_attr(attr));
        }
        if matches!(func.vis, Visibility::Inherited) {
            continue;
        }
        for input in &mut func.sig.inputs {
            if let FnArg::Typed(typed) = input {
                typed.attrs.retain(attr::is_lint);
            }
        }
    }
    item
}

#[cfg(test)]
mod tests {
    use syn::parse_quote;

    use super::*;

    fn messages(cx: Ctxt) -> Vec<String> {
        match cx.check() {
            Ok(()) => Vec::new(),
            Err(err) => err.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn aggregate_model() {
        let input: DeriveInput = parse_quote! {
            #[aggregate(name = "account")]
            struct BankAccount {
                balance: i64,
                #[identity]
                number: String,
            }
        };
        let cx = Ctxt::new();
        let model = Aggregate::from_syn(&cx, &input);
        assert!(messages(cx).is_empty());
        assert_eq!(model.fields.len(), 2);
        assert_eq!(model.identity.unwrap().ident.as_ref().unwrap(), "number");
        assert_eq!(model.attrs.name.unwrap().value(), "account");
    }

    #[test]
    fn aggregate_errors_are_collected() {
        let input: DeriveInput = parse_quote! {
            #[aggregate(nme = "x")]
            struct BankAccount<T> {
                #[identity]
                a: String,
                #[identity]
                b: String,
                #[identity]
                c: T,
            }
        };
        let cx = Ctxt::new();
        let model = Aggregate::from_syn(&cx, &input);
        assert!(model.identity.is_none());
        assert_eq!(
            messages(cx),
            [
                "unknown `#[aggregate]` key `nme`; expected `name` or `snapshot`",
                "`#[derive(Aggregate)]` does not support generic structs",
                "duplicate `#[identity]`: `#[derive(Aggregate)]` needs exactly one field marked `#[identity]`",
                "duplicate `#[identity]`: `#[derive(Aggregate)]` needs exactly one field marked `#[identity]`",
            ]
        );
    }

    #[test]
    fn aggregate_shapes() {
        for (input, message) in [
            (
                parse_quote!(
                    enum A {
                        X,
                    }
                ),
                "`#[derive(Aggregate)]` needs a struct with named fields, found an enum",
            ),
            (
                parse_quote!(
                    struct A(String);
                ),
                "`#[derive(Aggregate)]` needs a struct with named fields, found a tuple struct",
            ),
            (
                parse_quote!(
                    struct A;
                ),
                "`#[derive(Aggregate)]` needs a struct with named fields, found a unit struct",
            ),
            (
                parse_quote!(
                    struct A {
                        id: String,
                    }
                ),
                "`#[derive(Aggregate)]` needs exactly one field marked `#[identity]`",
            ),
        ] {
            let input: DeriveInput = input;
            let cx = Ctxt::new();
            Aggregate::from_syn(&cx, &input);
            assert_eq!(messages(cx), [message]);
        }
    }

    #[test]
    fn command_methods() {
        let item: ItemImpl = parse_quote! {
            impl BankAccount {
                /// Opens it.
                pub fn open_account(&self, #[serde(default)] initial: i64, #[allow(unused)] note: String) -> Result<E, Error> { todo!() }
                pub(crate) fn close(&self) -> Result<E, Error> { todo!() }
                fn helper(&mut self) {}
            }
        };
        let cx = Ctxt::new();
        let model = Impl::from_syn(&cx, Kind::Commands, &item);
        assert!(messages(cx).is_empty());
        let names = model.names.as_ref().unwrap();
        assert_eq!(names.command, "BankAccountCommand");
        assert_eq!(names.event, "BankAccountEvent");
        assert_eq!(model.methods.len(), 2);
        let open = &model.methods[0];
        assert_eq!(open.variant, "OpenAccount");
        assert_eq!(open.docs.len(), 1);
        assert_eq!(open.args.len(), 2);
        assert_eq!(open.args[0].attrs.len(), 1);
        assert!(
            open.args[1].attrs.is_empty(),
            "lint attributes stay on the argument"
        );
        assert_eq!(model.methods[1].variant, "Close");
    }

    #[test]
    fn command_method_errors_are_collected() {
        let item: ItemImpl = parse_quote! {
            impl BankAccount {
                pub fn a(&mut self) -> Result<E, Error> { todo!() }
                pub fn b(self) -> Result<E, Error> { todo!() }
                pub fn c() -> Result<E, Error> { todo!() }
                pub async fn d<T>(&self, (x, y): (u8, u8), r: &str) {}
            }
        };
        let cx = Ctxt::new();
        let model = Impl::from_syn(&cx, Kind::Commands, &item);
        assert_eq!(model.methods.len(), 4);
        assert_eq!(
            messages(cx),
            [
                "command methods take `&self`, found `&mut self`",
                "command methods take `&self`, found `self`",
                "command methods take `&self`, found no `self` argument",
                "command methods cannot be `async`",
                "command methods cannot be generic: the generated command type needs concrete field types",
                "`d` does not return a `Result`, but every `pub` method in `#[commands]` is a command: return `Result<SomeEvent, Error>`, or, if `d` is not a command, move it to a plain `impl` block (or make it private)",
                "command arguments must be plain identifiers: each one becomes a named field",
                "command arguments must be owned types: the generated command type cannot hold a reference",
            ]
        );
    }

    #[test]
    fn accessors_are_not_commands() {
        let item: ItemImpl = parse_quote! {
            impl Library {
                pub fn loans(&self) -> &[String] { &self.loans }
                pub fn pair(&self) -> (u8, u8) { (1, 2) }
                pub fn iter(&self) -> impl Iterator<Item = u8> { 0..1 }
                pub fn grouped(&self) -> ([u8; 2]) { [1, 2] }
                pub fn borrow(&self) -> thalo::Result<BorrowedEvent> { todo!() }
                pub fn count(&self) -> Count { todo!() }
            }
        };
        let cx = Ctxt::new();
        let model = Impl::from_syn(&cx, Kind::Commands, &item);
        let outputs: Vec<bool> = model.methods.iter().map(|m| m.output.is_some()).collect();
        // Paths go through the type system: `Count` may be an alias of a `Result`.
        assert_eq!(outputs, [false, false, false, false, true, true]);
        let messages = messages(cx);
        assert_eq!(messages.len(), 4, "{messages:?}");
        assert!(
            messages[0].starts_with(
                "`loans` does not return a `Result`, but every `pub` method in `#[commands]` is a command"
            ),
            "{messages:?}"
        );
    }

    #[test]
    fn event_method_errors_are_collected() {
        let item: ItemImpl = parse_quote! {
            impl<T> BankAccount {
                pub fn opened(&self) -> u8 { 1 }
                #[event(version = 2)]
                fn helper(&mut self) {}
            }
        };
        let cx = Ctxt::new();
        Impl::from_syn(&cx, Kind::Events, &item);
        assert_eq!(
            messages(cx),
            [
                "`#[events]` does not support generic impl blocks",
                "event methods take `&mut self`, found `&self`",
                "event methods must not return a value; events cannot fail",
                "`#[event]` goes on `pub` event methods; methods that are not `pub` are helpers",
            ]
        );
    }

    #[test]
    fn impl_shape_errors() {
        let item: ItemImpl = parse_quote! {
            impl Default for BankAccount {
                fn default() -> Self { todo!() }
            }
        };
        let cx = Ctxt::new();
        Impl::from_syn(&cx, Kind::Commands, &item);
        assert_eq!(
            messages(cx),
            [
                "`#[commands]` goes on an inherent impl block such as `impl BankAccount`, not on a trait impl",
            ]
        );
    }

    #[test]
    fn strip_removes_consumed_attributes() {
        let item: ItemImpl = parse_quote! {
            impl BankAccount {
                #[event(name = "Opened")]
                pub fn opened(&mut self, #[serde(default)] #[allow(unused)] x: u8) {}
                fn helper(&self, #[allow(unused)] y: u8) {}
            }
        };
        let stripped = strip_impl(Kind::Events, &item);
        let expected: ItemImpl = parse_quote! {
            impl BankAccount {
                pub fn opened(&mut self, #[allow(unused)] x: u8) {}
                fn helper(&self, #[allow(unused)] y: u8) {}
            }
        };
        assert_eq!(stripped, expected);
    }
}
