//! Layered configuration: a TOML document, then environment overrides, read into typed
//! sections by each crate. Pure: the caller reads the file and the environment.
//!
//! An environment variable `DRAGONFRUIT_<SECTION>__<KEY>=value` overrides `key` in
//! `[section]` (double underscore between section and key, case-insensitive; nested
//! sections use more `__`). The value is read as a TOML value when it parses as one
//! (`8`, `true`, `"x"`, `[1, 2]`) and as a string otherwise (`30s`, `127.0.0.1:3250`).

use std::time::Duration;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use thiserror::Error;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "DRAGONFRUIT_";

/// A configuration problem, reported to the operator before anything starts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML document does not parse.
    #[error("config file: {0}")]
    Toml(String),
    /// A section has a bad key or value.
    #[error("config section [{section}]: {message}")]
    Section {
        /// Section name.
        section: String,
        /// What is wrong.
        message: String,
    },
    /// An environment override is malformed.
    #[error("environment variable {var}: {message}")]
    Env {
        /// Variable name.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("config key {key}: {message}")]
    Invalid {
        /// Dotted key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The merged document: file plus overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSource {
    table: toml::Table,
}

impl ConfigSource {
    /// An empty document: every key at its default.
    pub fn empty() -> ConfigSource {
        ConfigSource::default()
    }

    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<ConfigSource, ConfigError> {
        let table = text.parse::<toml::Table>().map_err(|e| ConfigError::Toml(e.to_string()))?;
        Ok(ConfigSource { table })
    }

    /// Applies `DRAGONFRUIT_*` overrides from `vars` (pass `std::env::vars()`).
    pub fn with_env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Result<ConfigSource, ConfigError> {
        for (var, raw) in vars {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.len() < 2 || path.iter().any(String::is_empty) {
                let message = "expected DRAGONFRUIT_<SECTION>__<KEY>".to_owned();
                return Err(ConfigError::Env { var, message });
            }
            let value = parse_env_value(&raw);
            let mut table = &mut self.table;
            for part in &path[..path.len() - 1] {
                let entry = table.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let toml::Value::Table(inner) = entry else {
                    return Err(ConfigError::Env { var, message: format!("{part} is not a section") });
                };
                table = inner;
            }
            table.insert(path[path.len() - 1].clone(), value);
        }
        Ok(self)
    }

    /// Sets one dotted key (`"dispatch.concurrency"`), as builders in code do.
    pub fn set(&mut self, dotted: &str, value: impl Into<toml::Value>) {
        let parts: Vec<&str> = dotted.split('.').collect();
        let mut table = &mut self.table;
        for part in &parts[..parts.len() - 1] {
            let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            let toml::Value::Table(inner) = entry else { unreachable!("just made a table") };
            table = inner;
        }
        table.insert(parts[parts.len() - 1].to_owned(), value.into());
    }

    /// The sections of the document not among `known`, sorted: a misspelt section in a
    /// file, or a `DRAGONFRUIT_<SECTION>__<KEY>` variable with a misspelt section, which
    /// no part of the server would read. A program that knows every section it reads
    /// (`dragonfruit_net::config::SECTIONS`, `dragonfruit_rpc::config::SECTIONS`, its own)
    /// refuses them; unknown keys in a known section are errors already.
    pub fn unknown_sections(&self, known: &[&str]) -> Vec<String> {
        self.table.keys().filter(|name| !known.contains(&name.as_str())).cloned().collect()
    }

    /// Reads `[name]` into `T`; an absent section gives `T::default()`.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, ConfigError> {
        match self.table.get(name) {
            None => Ok(T::default()),
            Some(value) => value.clone().try_into().map_err(|e: toml::de::Error| ConfigError::Section {
                section: name.to_owned(),
                // One line: toml puts "in `key`" on a line of its own.
                message: e.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
            }),
        }
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

/// The longest duration a setting takes (100 years): deadlines computed from any setting
/// stay representable, so a huge value is a config error, not a crash later.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Checks duration settings against [`MAX_DURATION`]: those read from text are bounded
/// when parsed, those set in code (`Duration::MAX` for "never") are checked here, before
/// a thread adds one to the time now and panics.
pub fn check_durations(settings: &[(&'static str, Duration)]) -> Result<(), ConfigError> {
    match settings.iter().find(|(_, d)| *d > MAX_DURATION) {
        Some(&(key, d)) => {
            let message = format!("{d:?} is over the longest duration a setting takes, 100 years (876000h)");
            Err(ConfigError::Invalid { key, message })
        }
        None => Ok(()),
    }
}

/// `secs` as a duration if it is a number of seconds from 0 to [`MAX_DURATION`].
pub(crate) fn bounded_secs(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0 && secs <= MAX_DURATION.as_secs_f64()).then(|| Duration::from_secs_f64(secs))
}

/// Parses `"30s"`, `"250ms"`, `"1.5s"`, `"2m"`, `"1h"`, Go's compound form as Pitaya's
/// configs write it (`"1m30s"`, `"1h15m"`; units `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`), or a
/// bare number of seconds, up to [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    let (mut secs, mut first) = (0.0, true);
    loop {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, tail) = rest.split_at(split);
        let number: f64 = number.parse().ok()?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit.trim() {
            // A bare number is seconds, alone only ("1m30" is not 1m30s).
            "" if first && tail.is_empty() => 1.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        secs += number * scale;
        first = false;
        if tail.is_empty() {
            return bounded_secs(secs);
        }
        rest = tail;
    }
}

/// Serde helper for `Duration` fields written as `"30s"` or a number of seconds.
pub mod duration {
    use super::*;

    /// Deserializes a duration field.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(secs) => bounded_secs(secs as f64)
                .ok_or_else(|| D::Error::custom(format!("bad duration {secs}: over 100 years"))),
            Raw::Float(secs) => bounded_secs(secs).ok_or_else(|| D::Error::custom(format!("bad duration {secs}"))),
            Raw::Text(text) => parse_duration(&text).ok_or_else(|| D::Error::custom(format!("bad duration {text:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Dispatch {
        concurrency: usize,
        #[serde(with = "duration")]
        timeout: Duration,
        name: String,
    }

    #[test]
    fn file_then_env_then_set() {
        let src = ConfigSource::from_toml("[dispatch]\nconcurrency = 4\ntimeout = \"250ms\"\n").unwrap();
        let d: Dispatch = src.section("dispatch").unwrap();
        assert_eq!(d, Dispatch { concurrency: 4, timeout: Duration::from_millis(250), name: String::new() });
        let env = [
            ("DRAGONFRUIT_DISPATCH__CONCURRENCY".to_string(), "9".to_string()),
            ("DRAGONFRUIT_DISPATCH__NAME".to_string(), "a:b".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let mut src = src.with_env(env).unwrap();
        let d: Dispatch = src.section("dispatch").unwrap();
        assert_eq!((d.concurrency, d.name.as_str()), (9, "a:b"));
        src.set("dispatch.timeout", 2);
        assert_eq!(src.section::<Dispatch>("dispatch").unwrap().timeout, Duration::from_secs(2));
        assert!(src.section::<Dispatch>("missing").is_ok());
    }

    #[test]
    fn errors_are_reported() {
        let src = ConfigSource::from_toml("[dispatch]\nconcurency = 4\n").unwrap();
        assert!(matches!(src.section::<Dispatch>("dispatch"), Err(ConfigError::Section { .. })));
        let src = ConfigSource::from_toml("[dispatch]\nconcurrency = \"many\"\n").unwrap();
        let text = src.section::<Dispatch>("dispatch").unwrap_err().to_string();
        assert!(text.starts_with("config section [dispatch]: ") && text.ends_with("in `concurrency`"), "{text}");
        assert!(!text.contains('\n'), "one line: {text:?}");
        assert!(ConfigSource::from_toml("[[").is_err());
        assert!(ConfigSource::empty().with_env([("DRAGONFRUIT_X".into(), "1".into())]).is_err());
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("abc"), None);
    }

    /// Go's compound durations, as Pitaya's configs write them.
    #[test]
    fn compound_durations() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("1m30s", ms(90_000)),
            ("1h15m", ms(4_500_000)),
            ("2s500ms", ms(2_500)),
            ("1.5h", ms(5_400_000)),
            ("300ms", ms(300)),
            ("1500000ns", Duration::from_micros(1500)),
            ("250µs", Duration::from_micros(250)),
            (" 45 ", ms(45_000)),
        ] {
            assert_eq!(parse_duration(text), Some(want), "{text}");
        }
        for bad in ["", "s", "1m30", "0s5", "30 s 1", "1x", "1m-30s", "1.2.3s", "m30s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    /// Values too large for a deadline are config errors, not panics (`from_secs_f64`
    /// panics past u64 seconds; `Instant + d` past i64).
    #[test]
    fn huge_durations_are_errors() {
        assert_eq!(parse_duration("876000h"), Some(MAX_DURATION));
        assert_eq!(parse_duration("876001h"), None);
        assert!(check_durations(&[("a", Duration::ZERO), ("b", MAX_DURATION)]).is_ok());
        let err = check_durations(&[("a", MAX_DURATION), ("b", Duration::MAX)]).unwrap_err().to_string();
        assert!(err.starts_with("config key b: 18446744073709551615.999999999s is over the longest"), "{err}");
        assert_eq!(parse_duration("99999999999999999999999999h"), None);
        for toml in ["timeout = 1e30", "timeout = 9223372036854775807", "timeout = \"1e400s\"", "timeout = 4000000000"]
        {
            let src = ConfigSource::from_toml(&format!("[dispatch]\n{toml}\n")).unwrap();
            assert!(src.section::<Dispatch>("dispatch").is_err(), "{toml}");
        }
        let src = ConfigSource::from_toml("[dispatch]\ntimeout = 3153600000\n").unwrap();
        assert_eq!(src.section::<Dispatch>("dispatch").unwrap().timeout, MAX_DURATION);
    }
}
