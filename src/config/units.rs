//! The two value syntaxes of `config.toml` besides plain numbers and strings: byte sizes
//! (`"20GiB"`) and durations (`"5m"`).
//!
//! `bytesize` and `humantime` do the parsing; the wrappers here keep what the configuration has
//! always meant (a bare number of bytes or of seconds, no zero size) and say what was wrong in a
//! sentence the caller prefixes with the key.

use std::time::Duration;

/// Parses `"20GiB"`, `"512 MB"`, `"1048576"` into bytes (binary and decimal units, any case).
///
/// The units are `bytesize`'s: B; K/KB, M/MB, G/GB, T/TB, P/PB, E/EB (powers of 1000);
/// Ki/KiB, Mi/MiB, Gi/GiB, Ti/TiB, Pi/PiB, Ei/EiB (powers of 1024). Zero, and sizes that
/// do not fit in 64 bits, are refused.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let number_len = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(number_len);
    if number.parse::<f64>().is_err() {
        return Err(format!("{text:?} is not a size like \"20GiB\""));
    }
    let size = t.parse::<bytesize::ByteSize>().map_err(|_| {
        format!(
            "{text:?}: unknown unit {:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)",
            unit.trim()
        )
    })?;
    // `bytesize` saturates at u64::MAX rather than failing on overflow.
    match size.as_u64() {
        0 | u64::MAX => Err(format!("{text:?} must be a positive size")),
        bytes => Ok(bytes),
    }
}

/// Parses `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"30d"`; a bare number is seconds (`"10"`,
/// `"0.5"`).
///
/// With a unit the syntax is `humantime`'s: units ns, us, ms, s, m (minute), h, d, w, M
/// (month, 30.44 days), y (365.25 days) and their long forms (`"2 hours"`), and several parts
/// add up (`"1h 30m"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let not_a_duration = || format!("{text:?} is not a duration like \"30s\"");
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = t.parse().map_err(|_| not_a_duration())?;
        return Duration::try_from_secs_f64(secs).map_err(|_| format!("{text:?} is too long"));
    }
    humantime::parse_duration(t).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. } => {
            format!("{text:?}: unknown unit {unit:?} (use ms, s, m, h, d)")
        }
        humantime::DurationError::NumberOverflow => format!("{text:?} is too long"),
        _ => not_a_duration(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_byte_size("512 MB").unwrap(), 512_000_000);
        assert_eq!(parse_byte_size("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_byte_size("4096").unwrap(), 4096);
        for bad in ["", "GiB", "-1GiB", "0", "1XB", "1.2.3G"] {
            assert!(parse_byte_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn byte_size_syntax_and_messages() {
        assert_eq!(parse_byte_size(" 8kib ").unwrap(), 8192);
        assert_eq!(parse_byte_size("2t").unwrap(), 2_000_000_000_000);
        assert_eq!(parse_byte_size("1PiB").unwrap(), 1 << 50);
        assert_eq!(parse_byte_size("0.5KiB").unwrap(), 512);
        assert!(parse_byte_size("0.1").is_err(), "below one byte");
        assert!(parse_byte_size("20000000TiB")
            .unwrap_err()
            .contains("positive size"));
        assert!(parse_byte_size("12 parsecs")
            .unwrap_err()
            .contains("unknown unit \"parsecs\""));
        assert!(parse_byte_size("GiB").unwrap_err().contains("not a size"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn duration_syntax_and_messages() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(
            parse_duration(" 30d ").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        for bad in ["", "-1s", "soon", ".", "s", "1e3"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("5 fortnights")
            .unwrap_err()
            .contains("unknown unit \"fortnights\""));
        assert!(parse_duration("99999999999999999999999")
            .unwrap_err()
            .contains("too long"));
    }
}
