//! Shared pieces of configuration handling.
//!
//! Each crate owns its own config section (`prism_learner::Config`, ...) and the
//! binary composes them; what they share is the shape of a validation error, so
//! that the binary can report every invalid value the same way: one line that
//! names the key and the value, and exit code 64.

use std::fmt;

/// A configuration value that parsed but is not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid value {value} for `{key}`: {reason}")]
pub struct Invalid {
    /// Dotted key, e.g. `learner.lr`.
    pub key: String,
    /// The offending value as the user wrote it (TOML-ish rendering).
    pub value: String,
    /// Why it is not acceptable, e.g. "must be > 0".
    pub reason: String,
}

impl Invalid {
    /// An invalid-value error for `key`, rendering `value` with `Debug` so strings
    /// keep their quotes.
    pub fn new(key: impl Into<String>, value: impl fmt::Debug, reason: impl Into<String>) -> Self {
        Self { key: key.into(), value: format!("{value:?}"), reason: reason.into() }
    }
}

/// Checks used by many sections' `validate()`.
pub mod check {
    use super::Invalid;

    /// `value` must be strictly positive.
    pub fn positive<T: PartialOrd + Default + std::fmt::Debug>(key: &str, value: T) -> Result<(), Invalid> {
        if value > T::default() { Ok(()) } else { Err(Invalid::new(key, value, "must be > 0")) }
    }

    /// `value` must lie in `[lo, hi]`.
    pub fn in_range<T: PartialOrd + std::fmt::Debug + Copy>(key: &str, value: T, lo: T, hi: T) -> Result<(), Invalid> {
        if value >= lo && value <= hi {
            Ok(())
        } else {
            Err(Invalid::new(key, value, format!("must be between {lo:?} and {hi:?}")))
        }
    }

    /// `value` must be one of `allowed`.
    pub fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<(), Invalid> {
        if allowed.contains(&value) {
            Ok(())
        } else {
            Err(Invalid::new(key, value, format!("must be one of {}", allowed.join(", "))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_key_and_quoted_value() {
        let e = Invalid::new("redis.url", "ftp://x", "scheme must be redis, rediss or unix");
        assert_eq!(e.to_string(), "invalid value \"ftp://x\" for `redis.url`: scheme must be redis, rediss or unix");
    }

    #[test]
    fn checks_reject_out_of_range() {
        assert!(check::positive("a.b", 0.0f64).is_err());
        assert!(check::positive("a.b", 1u32).is_ok());
        assert_eq!(
            check::in_range("a.b", 1.5f32, 0.0, 1.0).unwrap_err().to_string(),
            "invalid value 1.5 for `a.b`: must be between 0.0 and 1.0"
        );
        assert!(check::one_of("a.b", "x", &["x", "y"]).is_ok());
        assert!(check::one_of("a.b", "z", &["x", "y"]).is_err());
    }
}
