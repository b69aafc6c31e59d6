//! Go's `time.Duration` text form, as kube-proxy's flags and config file use it: `30s`, `500ms`,
//! `1m30s`, `2h22m`, `1.5h`, `0`. Parsing follows Go's `time.ParseDuration`; formatting follows
//! `Duration.String()` (`1m30s`, `1h0m0s`, `1.5s`, `250ms`).
use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError(String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DurationError {}

const NS: u128 = 1;
const US: u128 = 1_000;
const MS: u128 = 1_000_000;
const S: u128 = 1_000_000_000;
const M: u128 = 60 * S;
const H: u128 = 60 * M;
/// Go durations are int64 nanoseconds.
const MAX_NANOS: u128 = i64::MAX as u128;

fn unit(u: &str) -> Option<u128> {
    Some(match u {
        "ns" => NS,
        "us" | "\u{b5}s" | "\u{3bc}s" => US,
        "ms" => MS,
        "s" => S,
        "m" => M,
        "h" => H,
        _ => return None,
    })
}

/// Parses a Go duration (`[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or `0`). Negative durations are
/// rejected (nothing in kube-proxy's configuration takes one) except `-0`.
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let bad = |why: &str| DurationError(format!("invalid duration {text:?}: {why}"));
    let mut s = text;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad("empty (use a number with a unit: ns, us, ms, s, m, h)"));
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, rest) = s.split_at(digits);
        s = rest;
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let n = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..n];
            s = &rest[n..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad("expected a number"));
        }
        let unit_len = s
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(s.len(), |(i, _)| i);
        if unit_len == 0 {
            return Err(bad("missing unit (ns, us, ms, s, m, h)"));
        }
        let (u, rest) = s.split_at(unit_len);
        s = rest;
        let scale = unit(u).ok_or_else(|| bad(&format!("unknown unit {u:?}")))?;
        let overflow = || bad("too large");
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| overflow())?
        };
        let mut nanos = int.checked_mul(scale).ok_or_else(overflow)?;
        if !frac_part.is_empty() {
            // Exact: fraction * scale / 10^digits, truncated (digits past nanoseconds drop).
            let frac = &frac_part[..frac_part.len().min(30)];
            let numerator: u128 = frac.parse().map_err(|_| overflow())?;
            let denominator = 10u128.pow(frac.len() as u32);
            nanos += numerator * scale / denominator;
        }
        total = total.checked_add(nanos).ok_or_else(overflow)?;
        if total > MAX_NANOS {
            return Err(overflow());
        }
    }
    if negative && total != 0 {
        return Err(bad("negative durations are not allowed here"));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Formats like Go's `Duration.String()`.
pub fn format_go_duration(d: Duration) -> String {
    let n = d.as_nanos();
    if n == 0 {
        return "0s".to_string();
    }
    if n < S {
        let (scale, suffix) = if n < US {
            (NS, "ns")
        } else if n < MS {
            (US, "\u{b5}s")
        } else {
            (MS, "ms")
        };
        return format!("{}{suffix}", decimal(n, scale));
    }
    let secs = n / S;
    let seconds = decimal(n % M, S);
    let (minutes, hours) = ((secs / 60) % 60, secs / 3600);
    if secs < 60 {
        format!("{seconds}s")
    } else if secs < 3600 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{hours}h{minutes}m{seconds}s")
    }
}

/// `n / scale` in decimal without trailing zeros (`1500, 1000` → `1.5`).
fn decimal(n: u128, scale: u128) -> String {
    let (int, frac) = (n / scale, n % scale);
    if frac == 0 {
        return int.to_string();
    }
    let width = scale.ilog10() as usize;
    let frac = format!("{frac:0width$}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

/// A duration in a config file: a Go duration string (`metav1.Duration`); a bare number is a
/// type error, as in kube-proxy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoDuration(pub Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"30s\", \"500ms\" or \"1m30s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GoDuration, E> {
                parse_go_duration(v).map(GoDuration).map_err(E::custom)
            }
        }
        // `any`, not `str`: YAML's `5` must be a type error, not the string "5".
        d.deserialize_any(V)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_go_duration(self.0))
    }
}

/// `serialize_with` helper for `Duration` fields.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_go_duration(*d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_go_syntax() {
        let cases: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("-0", Duration::ZERO),
            ("+0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("1s", ms(1000)),
            ("500ms", ms(500)),
            ("1m30s", ms(90_000)),
            ("2h", ms(7_200_000)),
            ("2h22m", ms((2 * 3600 + 22 * 60) * 1000)),
            ("1.5h", ms(5_400_000)),
            ("1.5s", ms(1500)),
            (".5s", ms(500)),
            ("5.s", ms(5000)),
            ("+5s", ms(5000)),
            ("100us", Duration::from_micros(100)),
            ("100\u{b5}s", Duration::from_micros(100)),
            ("100\u{3bc}s", Duration::from_micros(100)),
            ("7ns", Duration::from_nanos(7)),
            ("1h0m0s", ms(3_600_000)),
            ("24h0m0s", ms(86_400_000)),
            ("1.000000001s", Duration::from_nanos(1_000_000_001)),
            ("1.0000000019s", Duration::from_nanos(1_000_000_001)),
            ("2562047h", Duration::from_secs(2_562_047 * 3600)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_go_duration(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn rejects_what_go_rejects() {
        for text in [
            "", "5", "s", ".s", ".", "1x", "1.2.3s", "-5s", "5 s", "1s ", "30S", "1e3s", "--1s",
            "2562048h",
        ] {
            assert!(parse_go_duration(text).is_err(), "{text:?} should fail");
        }
        let e = parse_go_duration("5").unwrap_err().to_string();
        assert!(e.contains("missing unit"), "{e}");
        let e = parse_go_duration("5d").unwrap_err().to_string();
        assert!(e.contains("unknown unit \"d\""), "{e}");
    }

    #[test]
    fn formats_like_go() {
        let cases: &[(Duration, &str)] = &[
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::from_nanos(1500), "1.5\u{b5}s"),
            (ms(1), "1ms"),
            (Duration::from_micros(1500), "1.5ms"),
            (ms(200), "200ms"),
            (ms(1000), "1s"),
            (ms(1500), "1.5s"),
            (ms(30_000), "30s"),
            (ms(90_000), "1m30s"),
            (ms(900_000), "15m0s"),
            (ms(3_600_000), "1h0m0s"),
            (ms(86_400_000), "24h0m0s"),
            (ms(3_723_500), "1h2m3.5s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_go_duration(*d), *want, "{d:?}");
            assert_eq!(parse_go_duration(want), Ok(*d), "round trip {want}");
        }
    }

    #[test]
    fn config_durations_must_be_strings() {
        let d: GoDuration = yaml_serde::from_str("\"1m30s\"").unwrap();
        assert_eq!(d.0, ms(90_000));
        let e = yaml_serde::from_str::<GoDuration>("5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a duration string"), "{e}");
        let e = yaml_serde::from_str::<GoDuration>("5x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown unit"), "{e}");
    }
}
