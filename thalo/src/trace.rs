//! W3C Trace Context on events, and the `execute` span.
//!
//! A command's events carry the trace context of the request that caused them in their
//! [`Metadata`] (headers `traceparent` and `tracestate`, as in the
//! [W3C Trace Context](https://www.w3.org/TR/trace-context/) recommendation), so whoever
//! handles them later, in another process, continues the same trace.

use std::borrow::Cow;
use std::fmt::Display;

use tracing::Span;

use crate::Metadata;

/// Whether `value` is a `traceparent` of version `00`: `00-<trace id>-<parent id>-<flags>`
/// with 32, 16 and 2 lowercase hex digits, and neither id all zeros (both are invalid
/// in the recommendation).
pub(crate) fn is_valid_traceparent(value: &str) -> bool {
    let bytes = value.as_bytes();
    if bytes.len() != 55 || !value.starts_with("00-") || bytes[35] != b'-' || bytes[52] != b'-' {
        return false;
    }
    let (trace_id, parent_id, flags) = (&bytes[3..35], &bytes[36..52], &bytes[53..55]);
    let lower_hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let zeros = |s: &[u8]| s.iter().all(|&b| b == b'0');
    lower_hex(trace_id)
        && lower_hex(parent_id)
        && lower_hex(flags)
        && !zeros(trace_id)
        && !zeros(parent_id)
}

/// The most a `tracestate` may hold: 32 list members of printable ASCII, 512 characters
/// (the length every platform must propagate).
pub(crate) fn is_valid_tracestate(value: &str) -> bool {
    !value.trim().is_empty()
        && value.len() <= 512
        && value.split(',').count() <= 32
        && value.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// The span of one command, retries included: `attempt` is recorded per attempt and
/// `outcome` at the end.
pub(crate) fn execute_span(aggregate_type: &'static str, aggregate_id: &dyn Display) -> Span {
    tracing::info_span!(
        "execute",
        aggregate_type,
        aggregate_id = %aggregate_id,
        attempt = tracing::field::Empty,
        outcome = tracing::field::Empty,
        code = tracing::field::Empty,
    )
}

/// Records a command's outcome on its `execute` span, and the rejection's code (an
/// invariant's, or a domain error's [`ErrorCode`](crate::ErrorCode)) when it has one,
/// so that logs and traces show why a command was rejected.
pub(crate) fn record_outcome<T>(span: &Span, outcome: &str, result: &Result<T, crate::Error>) {
    span.record("outcome", outcome);
    if let Err(err) = result {
        if let Some(code) = err.code() {
            span.record("code", code);
        }
    }
}

/// `metadata` with the trace context of `span` (the command's `execute` span, or the
/// caller's span when `execute` is filtered out), unless it carries a `traceparent`
/// already. Without the `opentelemetry` feature, `metadata` as it is.
pub(crate) fn stamp<'a>(metadata: &'a Metadata, span: &Span) -> Cow<'a, Metadata> {
    #[cfg(feature = "opentelemetry")]
    if metadata.traceparent().is_none() {
        if let Some((traceparent, tracestate)) =
            otel::context_of(span).or_else(|| otel::context_of(&Span::current()))
        {
            let mut stamped = metadata.clone().with_traceparent(traceparent);
            if let Some(tracestate) = tracestate {
                stamped = stamped.with_tracestate(tracestate);
            }
            return Cow::Owned(stamped);
        }
    }
    #[cfg(not(feature = "opentelemetry"))]
    let _ = span;
    Cow::Borrowed(metadata)
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::TraceContextExt;
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// The `traceparent` and `tracestate` of `span`'s OpenTelemetry context, when it has
    /// a valid one (the span is enabled and `tracing-opentelemetry`'s layer is
    /// installed).
    pub(super) fn context_of(span: &Span) -> Option<(String, Option<String>)> {
        if span.is_disabled() {
            return None;
        }
        let cx = span.context();
        let span_ref = cx.span();
        let context = span_ref.span_context();
        if !context.is_valid() {
            return None;
        }
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        );
        let tracestate = context.trace_state().header();
        Some((traceparent, (!tracestate.is_empty()).then_some(tracestate)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_format() {
        assert!(is_valid_traceparent(VALID));
        assert!(is_valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        ));
        for invalid in [
            "",
            "garbage",
            // another version, upper case, wrong lengths, wrong separators
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            // all-zero ids
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // multi-byte characters of the right byte length
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert!(!is_valid_traceparent(invalid), "{invalid}");
        }
    }

    #[test]
    fn tracestate_format() {
        assert!(is_valid_tracestate(
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
        ));
        assert!(!is_valid_tracestate(""));
        assert!(!is_valid_tracestate("a=1\n"));
        assert!(!is_valid_tracestate(&"a".repeat(513)));
        assert!(!is_valid_tracestate(&vec!["a=1"; 33].join(",")));
    }
}
