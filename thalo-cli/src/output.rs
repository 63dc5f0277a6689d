//! Printing: tables for people, JSON for programs.

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

use crate::error::{CliError, Result};

/// A command's result: printed as text (tables) or as JSON with `--json`.
pub(crate) trait Report: Serialize {
    /// The human-readable form, ending with a newline.
    fn text(&self) -> String;
}

/// Prints `report` to standard output, as JSON or as text.
pub(crate) fn emit(report: &impl Report, json: bool) -> Result<()> {
    if json {
        let mut text =
            serde_json::to_string_pretty(report).map_err(|source| CliError::Json { source })?;
        text.push('\n');
        write_stdout(&text)
    } else {
        write_stdout(&report.text())
    }
}

/// Writes to standard output. A closed pipe (`thalo parked list | head`) is not an
/// error: the reader has what it wanted.
pub(crate) fn write_stdout(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CliError::Output { source: err })
        }
        _ => Ok(()),
    }
}

/// A table with a header row.
pub(crate) fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    table
}

/// `heading`, then the table, or `(none)` when it has no rows.
pub(crate) fn section(out: &mut String, heading: &str, table: &Table) {
    out.push_str(heading);
    out.push('\n');
    if table.row_count() == 0 {
        out.push_str("  (none)\n");
    } else {
        out.push_str(&table.to_string());
        out.push('\n');
    }
}

/// `1.2s`, `3m 04s`, `2h 05m`, `3d 04h`; `-` for none.
pub(crate) fn age(duration: Option<Duration>) -> String {
    let Some(duration) = duration else {
        return "-".to_owned();
    };
    let secs = duration.as_secs();
    match secs {
        0..=59 => format!("{:.1}s", duration.as_secs_f64()),
        60..=3599 => format!("{}m {:02}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// `1 event`, `2 events`.
pub(crate) fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Seconds, for JSON.
pub(crate) fn seconds(duration: Option<Duration>) -> Option<f64> {
    duration.map(|d| d.as_secs_f64())
}

/// A duration from the seconds Postgres computed (`EXTRACT(EPOCH FROM ...)`).
pub(crate) fn from_seconds(seconds: Option<f64>) -> Option<Duration> {
    seconds.map(|s| Duration::from_secs_f64(s.max(0.0)))
}

/// A timestamp in RFC 3339, to the second.
pub(crate) fn time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `text` cut to `max` characters, with `…` when cut. Tables stay readable; the JSON
/// output and `dlq show` have the whole text.
pub(crate) fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut clipped: String = text.chars().take(max.saturating_sub(1)).collect();
    clipped.push('…');
    clipped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_well() {
        assert_eq!(age(None), "-");
        assert_eq!(age(Some(Duration::from_millis(1_250))), "1.2s");
        assert_eq!(age(Some(Duration::from_secs(184))), "3m 04s");
        assert_eq!(age(Some(Duration::from_secs(7_500))), "2h 05m");
        assert_eq!(
            age(Some(Duration::from_secs(3 * 86_400 + 4 * 3600))),
            "3d 04h"
        );
    }

    #[test]
    fn clips_long_text() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("a longer text", 6), "a lon…");
        assert_eq!(count(1, "batch", "batches"), "1 batch");
        assert_eq!(count(2, "event", "events"), "2 events");
        assert_eq!(count(0, "stream", "streams"), "0 streams");
    }

    #[test]
    fn empty_sections_say_none() {
        let mut out = String::new();
        section(&mut out, "Parked", &table(["a", "b"]));
        assert_eq!(out, "Parked\n  (none)\n");
    }
}
