//! Formatting and parsing amounts in minor units.

/// Formats cents as `$1,234.56` (or `-$0.10`).
pub fn format_cents(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    let units = (abs / 100).to_string();
    let mut grouped = String::new();
    for (i, c) in units.chars().enumerate() {
        if i > 0 && (units.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{sign}${grouped}.{:02}", abs % 100)
}

/// Parses a non-negative `12`, `12.3` or `12.34` (dollars) into cents.
///
/// # Errors
///
/// Returns a message when the text is not an amount with at most two decimals.
pub fn parse_cents(text: &str) -> Result<i64, String> {
    let text = text.trim().trim_start_matches('$');
    let (units, fraction) = text.split_once('.').unwrap_or((text, ""));
    let invalid = || format!("`{text}` is not an amount like 12.34");
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if units.is_empty() && fraction.is_empty()
        || fraction.len() > 2
        || !digits(units)
        || !digits(fraction)
    {
        return Err(invalid());
    }
    let units: i64 = if units.is_empty() {
        0
    } else {
        units.parse().map_err(|_| invalid())?
    };
    let fraction: i64 = match fraction.len() {
        0 => 0,
        1 => fraction.parse::<i64>().map_err(|_| invalid())? * 10,
        _ => fraction.parse().map_err(|_| invalid())?,
    };
    units
        .checked_mul(100)
        .and_then(|c| c.checked_add(fraction))
        .ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(format_cents(0), "$0.00");
        assert_eq!(format_cents(5), "$0.05");
        assert_eq!(format_cents(123_456_78), "$123,456.78");
        assert_eq!(format_cents(-10), "-$0.10");
        assert_eq!(format_cents(1_000_00), "$1,000.00");
    }

    #[test]
    fn parses() {
        assert_eq!(parse_cents("12"), Ok(1200));
        assert_eq!(parse_cents("12.3"), Ok(1230));
        assert_eq!(parse_cents("$12.34"), Ok(1234));
        assert_eq!(parse_cents(".5"), Ok(50));
        assert!(parse_cents("12.345").is_err());
        assert!(parse_cents("abc").is_err());
        assert!(parse_cents("").is_err());
        assert!(parse_cents("-5").is_err());
        assert!(parse_cents("1.-5").is_err());
    }
}
