//! Parsing of the attributes the macros read: `#[aggregate(...)]`, `#[identity]`,
//! `#[event(...)]`, `#[code("...")]`, and the (empty) arguments of `#[commands]` and
//! `#[events]`.
//!
//! Parsing reports every problem to the [`Ctxt`] and keeps going, so one compile shows
//! all misspelled keys and bad values.

use proc_macro2::{Group, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::{Attribute, ExprPath, LitInt, LitStr, Meta, Path, Token};

use crate::ctxt::Ctxt;

/// `#[aggregate(name = "...", snapshot)]` on a `#[derive(Aggregate)]` struct.
#[derive(Default)]
pub(crate) struct Aggregate {
    /// The stable type name, when overridden.
    pub(crate) name: Option<LitStr>,
    /// The `snapshot` key (kept for its span), when snapshots are enabled.
    pub(crate) snapshot: Option<Path>,
}

/// `#[event(name = "...", version = N, upcast = path)]` on an event method.
#[derive(Default)]
pub(crate) struct Event {
    /// The stable event type name, when overridden.
    pub(crate) name: Option<LitStr>,
    /// The current schema version (at least 1), when not 1.
    pub(crate) version: Option<(u16, LitInt)>,
    /// The function that upcasts older payloads.
    pub(crate) upcast: Option<ExprPath>,
}

/// Reads every `#[aggregate(...)]` attribute of the derive input.
pub(crate) fn aggregate(cx: &Ctxt, attrs: &[Attribute]) -> Aggregate {
    let mut out = Aggregate::default();
    for attr in attrs
        .iter()
        .filter(|attr| attr.path().is_ident("aggregate"))
    {
        let result = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                let lit: LitStr = meta.value()?.parse()?;
                let name = lit.value();
                if name.is_empty() {
                    cx.error_spanned_by(&lit, "aggregate names must not be empty");
                } else if !valid_aggregate_name(&name) {
                    cx.error_spanned_by(
                        &lit,
                        format_args!(
                            "aggregate names use only `a-z`, `0-9`, `_`, `.` and `-`, found `{name}`"
                        ),
                    );
                }
                set_once(cx, &meta, "aggregate", &mut out.name, lit);
            } else if meta.path.is_ident("snapshot") {
                if !meta.input.is_empty() && !meta.input.peek(Token![,]) {
                    cx.error_spanned_by(&meta.path, "`snapshot` takes no value: write `#[aggregate(snapshot)]`");
                    skip_value(&meta)?;
                }
                set_once(cx, &meta, "aggregate", &mut out.snapshot, meta.path.clone());
            } else {
                cx.error_spanned_by(
                    &meta.path,
                    format_args!(
                        "unknown `#[aggregate]` key `{}`; expected `name` or `snapshot`",
                        path_to_string(&meta.path)
                    ),
                );
                skip_value(&meta)?;
            }
            Ok(())
        });
        if let Err(err) = result {
            cx.syn_error(err);
        }
    }
    out
}

/// Reads every `#[event(...)]` attribute of an event method.
pub(crate) fn event(cx: &Ctxt, attrs: &[Attribute]) -> Event {
    let mut out = Event::default();
    for attr in attrs.iter().filter(|attr| is_event_attr(attr)) {
        let result = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                let lit: LitStr = meta.value()?.parse()?;
                let name = lit.value();
                if name.is_empty() {
                    cx.error_spanned_by(&lit, "event names must not be empty");
                } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    cx.error_spanned_by(
                        &lit,
                        format_args!("event names must not contain whitespace, found `{name}`"),
                    );
                }
                set_once(cx, &meta, "event", &mut out.name, lit);
            } else if meta.path.is_ident("version") {
                let lit: LitInt = meta.value()?.parse()?;
                match lit.base10_parse::<u16>() {
                    Ok(0) => cx.error_spanned_by(&lit, "event versions start at 1"),
                    Ok(version) => set_once(cx, &meta, "event", &mut out.version, (version, lit)),
                    Err(_) => {
                        cx.error_spanned_by(&lit, "`version` must be an integer from 1 to 65535")
                    }
                }
            } else if meta.path.is_ident("upcast") {
                let path: ExprPath = meta.value()?.parse()?;
                set_once(cx, &meta, "event", &mut out.upcast, path);
            } else {
                cx.error_spanned_by(
                    &meta.path,
                    format_args!(
                        "unknown `#[event]` key `{}`; expected `name`, `version` or `upcast`",
                        path_to_string(&meta.path)
                    ),
                );
                skip_value(&meta)?;
            }
            Ok(())
        });
        if let Err(err) = result {
            cx.syn_error(err);
        }
    }
    if let (Some(upcast), None) = (&out.upcast, &out.version) {
        cx.error_spanned_by(
            upcast,
            "`upcast` needs a `version` above 1: it converts payloads of older versions",
        );
    }
    out
}

/// Reads the `#[code("...")]` attributes of a type or variant of `#[derive(ErrorCode)]`:
/// the code, when there is exactly one well-formed attribute.
pub(crate) fn code(cx: &Ctxt, attrs: &[Attribute]) -> Option<LitStr> {
    let mut out: Option<LitStr> = None;
    for attr in attrs.iter().filter(|attr| is_code_attr(attr)) {
        let lit = match &attr.meta {
            Meta::List(list) => match list.parse_args::<LitStr>() {
                Ok(lit) => lit,
                Err(_) => {
                    cx.error_spanned_by(
                        &list.tokens,
                        "`#[code]` takes one string, the code: `#[code(\"MEMBER_SUSPENDED\")]`",
                    );
                    continue;
                }
            },
            // An empty `#[code()]` is a list too; `#[code]` and `#[code = "..."]` are not.
            _ => {
                cx.error_spanned_by(
                    attr,
                    "`#[code]` takes the code in parentheses: `#[code(\"MEMBER_SUSPENDED\")]`",
                );
                continue;
            }
        };
        let code = lit.value();
        if code.is_empty() {
            cx.error_spanned_by(&lit, "error codes must not be empty");
        } else if code.chars().any(|c| c.is_whitespace() || c.is_control()) {
            cx.error_spanned_by(
                &lit,
                format_args!("error codes must not contain whitespace, found `{code}`"),
            );
        }
        if out.is_some() {
            cx.error_spanned_by(attr, "duplicate `#[code]`: a value has one code");
        } else {
            out = Some(lit);
        }
    }
    out
}

/// `#[code(...)]`, which `#[derive(ErrorCode)]` reads.
pub(crate) fn is_code_attr(attr: &Attribute) -> bool {
    attr.path().is_ident("code")
}

/// Reports arguments given to `#[commands]` or `#[events]`, which take none.
pub(crate) fn no_args(cx: &Ctxt, macro_name: &str, args: TokenStream) {
    if !args.is_empty() {
        cx.error_spanned_by(args, format_args!("`#[{macro_name}]` takes no arguments"));
    }
}

/// `#[identity]`, which marks the aggregate's identity field.
pub(crate) fn is_identity(cx: &Ctxt, attr: &Attribute) -> bool {
    if !attr.path().is_ident("identity") {
        return false;
    }
    if let Err(err) = attr.meta.require_path_only() {
        cx.syn_error(syn::Error::new(
            err.span(),
            "`#[identity]` takes no arguments",
        ));
    }
    true
}

/// `#[event(...)]`, which `#[events]` reads and removes.
pub(crate) fn is_event_attr(attr: &Attribute) -> bool {
    attr.path().is_ident("event")
}

/// `#[doc = "..."]`, i.e. a `///` comment.
pub(crate) fn is_doc(attr: &Attribute) -> bool {
    attr.path().is_ident("doc")
}

/// Lint attributes (`#[allow(...)]` and friends), which stay on a method's argument
/// instead of moving to the generated field.
pub(crate) fn is_lint(attr: &Attribute) -> bool {
    ["allow", "expect", "warn", "deny", "forbid"]
        .iter()
        .any(|lint| attr.path().is_ident(lint))
}

/// `#[cfg(...)]` or `#[cfg_attr(...)]`.
pub(crate) fn is_cfg(attr: &Attribute) -> bool {
    attr.path().is_ident("cfg") || attr.path().is_ident("cfg_attr")
}

fn valid_aggregate_name(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

fn set_once<T>(cx: &Ctxt, meta: &ParseNestedMeta<'_>, attr: &str, slot: &mut Option<T>, value: T) {
    if slot.is_some() {
        cx.error_spanned_by(
            &meta.path,
            format_args!("duplicate `{}` in `#[{attr}]`", path_to_string(&meta.path)),
        );
    } else {
        *slot = Some(value);
    }
}

/// Skips the value of a key that was already reported, so the keys after it are still
/// checked.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.value()?.parse::<syn::Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        meta.input.parse::<Group>()?;
    }
    Ok(())
}

fn path_to_string(path: &Path) -> String {
    let segments: Vec<String> = path
        .segments
        .iter()
        .map(|segment| segment.ident.to_string())
        .collect();
    segments.join("::")
}

#[cfg(test)]
mod tests {
    use quote::quote;
    use syn::parse_quote;

    use super::*;

    fn messages(cx: Ctxt) -> Vec<String> {
        match cx.check() {
            Ok(()) => Vec::new(),
            Err(err) => err.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn aggregate_keys() {
        let attrs: Vec<Attribute> = vec![parse_quote!(#[aggregate(name = "account", snapshot)])];
        let cx = Ctxt::new();
        let parsed = aggregate(&cx, &attrs);
        assert!(messages(cx).is_empty());
        assert_eq!(parsed.name.unwrap().value(), "account");
        assert!(parsed.snapshot.is_some());
    }

    #[test]
    fn aggregate_reports_every_bad_key() {
        let attrs: Vec<Attribute> = vec![
            parse_quote!(#[aggregate(nme = "x", name = "Bad Name", snapshot = true)]),
            parse_quote!(#[aggregate(snapshot)]),
        ];
        let cx = Ctxt::new();
        aggregate(&cx, &attrs);
        assert_eq!(
            messages(cx),
            [
                "unknown `#[aggregate]` key `nme`; expected `name` or `snapshot`",
                "aggregate names use only `a-z`, `0-9`, `_`, `.` and `-`, found `Bad Name`",
                "`snapshot` takes no value: write `#[aggregate(snapshot)]`",
                "duplicate `snapshot` in `#[aggregate]`",
            ]
        );
    }

    #[test]
    fn event_keys() {
        let attrs: Vec<Attribute> =
            vec![parse_quote!(#[event(name = "Opened", version = 3, upcast = upcasts::opened)])];
        let cx = Ctxt::new();
        let parsed = event(&cx, &attrs);
        assert!(messages(cx).is_empty());
        assert_eq!(parsed.name.unwrap().value(), "Opened");
        assert_eq!(parsed.version.unwrap().0, 3);
        let upcast = parsed.upcast.unwrap();
        assert_eq!(quote!(#upcast).to_string(), "upcasts :: opened");
    }

    #[test]
    fn event_bad_values() {
        let attrs: Vec<Attribute> = vec![parse_quote!(
            #[event(name = "", version = 0, upcast = f, colour = "red")]
        )];
        let cx = Ctxt::new();
        event(&cx, &attrs);
        assert_eq!(
            messages(cx),
            [
                "event names must not be empty",
                "event versions start at 1",
                "unknown `#[event]` key `colour`; expected `name`, `version` or `upcast`",
                "`upcast` needs a `version` above 1: it converts payloads of older versions",
            ]
        );
    }

    #[test]
    fn code_reads_one_string() {
        let cx = Ctxt::new();
        let parsed = code(
            &cx,
            &[
                parse_quote!(#[doc = "x"]),
                parse_quote!(#[code("SUSPENDED")]),
            ],
        );
        assert!(messages(cx).is_empty());
        assert_eq!(parsed.unwrap().value(), "SUSPENDED");

        let cx = Ctxt::new();
        assert!(code(&cx, &[parse_quote!(#[error("x")])]).is_none());
        assert!(messages(cx).is_empty());
    }

    #[test]
    fn code_reports_every_malformed_attribute() {
        let attrs: Vec<Attribute> = vec![
            parse_quote!(#[code]),
            parse_quote!(#[code = "A"]),
            parse_quote!(#[code(A)]),
            parse_quote!(#[code("A", "B")]),
            parse_quote!(#[code("")]),
            parse_quote!(#[code("A B")]),
            parse_quote!(#[code("A")]),
        ];
        let cx = Ctxt::new();
        let parsed = code(&cx, &attrs);
        assert_eq!(parsed.unwrap().value(), "", "the first well-formed one");
        assert_eq!(
            messages(cx),
            [
                "`#[code]` takes the code in parentheses: `#[code(\"MEMBER_SUSPENDED\")]`",
                "`#[code]` takes the code in parentheses: `#[code(\"MEMBER_SUSPENDED\")]`",
                "`#[code]` takes one string, the code: `#[code(\"MEMBER_SUSPENDED\")]`",
                "`#[code]` takes one string, the code: `#[code(\"MEMBER_SUSPENDED\")]`",
                "error codes must not be empty",
                "error codes must not contain whitespace, found `A B`",
                "duplicate `#[code]`: a value has one code",
                "duplicate `#[code]`: a value has one code",
            ]
        );
    }

    #[test]
    fn identity_takes_no_arguments() {
        let cx = Ctxt::new();
        assert!(is_identity(&cx, &parse_quote!(#[identity])));
        assert!(is_identity(&cx, &parse_quote!(#[identity(x)])));
        assert!(!is_identity(&cx, &parse_quote!(#[serde(default)])));
        assert_eq!(messages(cx), ["`#[identity]` takes no arguments"]);
    }
}
