//! Checks across the methods of one impl block, after each method was checked alone.

use std::collections::HashMap;

use crate::ast::{Impl, Method};
use crate::ctxt::Ctxt;

/// Two command methods must not become the same variant (`open` and `open_`).
pub(crate) fn commands(cx: &Ctxt, input: &Impl<'_>) {
    let mut seen: HashMap<String, &Method<'_>> = HashMap::new();
    for method in &input.methods {
        if let Some(first) = seen.get(&method.variant.to_string()) {
            cx.error_spanned_by(
                method.ident,
                format_args!(
                    "command methods `{}` and `{}` both become the variant `{}`",
                    first.ident, method.ident, method.variant
                ),
            );
        } else {
            seen.insert(method.variant.to_string(), method);
        }
    }
}

/// Event names are stored with every event, so they must be unique per aggregate, and
/// two methods must not become the same event struct.
pub(crate) fn events(cx: &Ctxt, input: &Impl<'_>) {
    let mut structs: HashMap<String, &Method<'_>> = HashMap::new();
    let mut names: HashMap<String, &Method<'_>> = HashMap::new();
    for method in &input.methods {
        let event_struct = method.event_struct().to_string();
        if let Some(first) = structs.get(&event_struct) {
            cx.error_spanned_by(
                method.ident,
                format_args!(
                    "event methods `{}` and `{}` both become the struct `{event_struct}`",
                    first.ident, method.ident
                ),
            );
            continue;
        }
        structs.insert(event_struct, method);

        let name = method.event_name();
        if let Some(first) = names.get(&name) {
            let message = format!(
                "duplicate event name `{name}`, also used by `{}`; event names must be unique within an aggregate",
                first.ident
            );
            match &method.event.name {
                Some(lit) => cx.error_spanned_by(lit, message),
                None => cx.error_spanned_by(method.ident, message),
            }
        } else {
            names.insert(name, method);
        }
    }
}

#[cfg(test)]
mod tests {
    use syn::{parse_quote, ItemImpl};

    use super::*;
    use crate::ast::Kind;

    fn messages(cx: Ctxt) -> Vec<String> {
        match cx.check() {
            Ok(()) => Vec::new(),
            Err(err) => err.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn duplicate_variants() {
        let item: ItemImpl = parse_quote! {
            impl A {
                pub fn open(&self) -> R { todo!() }
                pub fn open_(&self) -> R { todo!() }
            }
        };
        let cx = Ctxt::new();
        let input = Impl::from_syn(&cx, Kind::Commands, &item);
        commands(&cx, &input);
        assert_eq!(
            messages(cx),
            ["command methods `open` and `open_` both become the variant `Open`"]
        );
    }

    #[test]
    fn duplicate_event_names() {
        let item: ItemImpl = parse_quote! {
            impl A {
                pub fn opened(&mut self) {}
                #[event(name = "Opened")]
                pub fn reopened(&mut self) {}
                pub fn closed(&mut self) {}
            }
        };
        let cx = Ctxt::new();
        let input = Impl::from_syn(&cx, Kind::Events, &item);
        events(&cx, &input);
        assert_eq!(
            messages(cx),
            ["duplicate event name `Opened`, also used by `opened`; event names must be unique within an aggregate"]
        );
    }
}
