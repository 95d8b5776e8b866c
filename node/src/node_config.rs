//! The `grid-node` config file (`grid-node --config FILE`): TOML whose keys are the long flags.
//!
//! A key is a flag's long name with `_` for `-` (`memory_limit` for `--memory-limit`); a switch
//! takes `true` or `false`, a flag with a value a string or a number (`slots = 4`,
//! `memory_limit = "512M"`, `cpu_limit = 0.5`), a repeatable flag an array
//! (`bootstrap = ["/ip4/..."]`). The file is turned into the arguments those keys stand for
//! and clap parses them with the same value parsers as the command line, so a value means in
//! the file exactly what it means as a flag.
//!
//! Precedence, highest first: the command line, the environment (`GRID_DATA_DIR`,
//! `GRID_BOOTSTRAP`, ...), the file, the defaults. A flag given on the command line replaces the
//! file's key as a whole, repeatable ones included: `--bootstrap X` with
//! `bootstrap = ["Y", "Z"]` in the file joins through X only.
//!
//! This module owns the file's syntax and its translation into arguments; which flags exist,
//! and what they mean, is the `grid-node` command's ([`crate::node_cli`]).

use std::ffi::OsString;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::ArgAction;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Largest config file read: a config is a page of keys, not data.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Arguments of the command that have no key: they are about the command line itself.
pub const NOT_KEYS: [&str; 3] = ["help", "version", "config"];

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_CONFIG_BYTES`].
    #[error("config file {} is larger than {MAX_CONFIG_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not TOML.
    #[error("{}:{line}: not valid TOML: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Line of the error (1-based).
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A key that is no flag of the command.
    #[error("{}:{line}: unknown key `{key}`{}", path.display(),
        suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// Line of the key (1-based).
        line: usize,
        /// The key.
        key: String,
        /// The nearest known key, when one is close.
        suggestion: Option<String>,
    },
    /// A key whose value is of the wrong kind, or that the flag refuses.
    #[error("{}:{line}: bad value for `{key}`: {message}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// Line of the value (1-based).
        line: usize,
        /// The key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// One key of a config file, as the arguments it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The clap id of the flag it sets.
    pub id: String,
    /// Line of the key (1-based).
    pub line: usize,
    /// The arguments, e.g. `["--slots=4"]`; none for a switch set to `false`.
    pub args: Vec<OsString>,
}

/// The config key of a flag: its long name with `_` for `-`. `None` for an argument that has
/// none ([`NOT_KEYS`], positionals).
pub fn key_of(arg: &clap::Arg) -> Option<String> {
    if NOT_KEYS.contains(&arg.get_id().as_str()) {
        return None;
    }
    arg.get_long().map(|l| l.replace('-', "_"))
}

/// Reads a config file, at most [`MAX_CONFIG_BYTES`].
pub fn read(path: &Path) -> Result<String, ConfigError> {
    let read_err = |source| ConfigError::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text).map_err(read_err)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { path: path.to_path_buf() });
    }
    Ok(text)
}

/// The entries of a config file's text (`path` only names it in errors), in the file's order,
/// checked against the flags of `cmd`: every key must be one, of the kind of value it takes.
/// Values are not parsed here (clap does that with the flags' own parsers; see [`check`]).
pub fn entries(cmd: &clap::Command, path: &Path, text: &str) -> Result<Vec<Entry>, ConfigError> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1).unwrap_or(1)
    };
    let table = DeTable::parse(text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        line: line_of(e.span()),
        message: e.message().trim().to_string(),
    })?;
    let keys: Vec<(String, &clap::Arg)> =
        cmd.get_arguments().filter_map(|a| key_of(a).map(|k| (k, a))).collect();
    let mut items: Vec<(&Spanned<toml::de::DeString<'_>>, &Spanned<DeValue<'_>>)> =
        table.get_ref().iter().collect();
    items.sort_by_key(|(k, _)| k.span().start);
    let mut out = Vec::with_capacity(items.len());
    for (key, value) in items {
        let line = line_of(Some(key.span()));
        let name = key.get_ref().as_ref();
        let Some((_, arg)) = keys.iter().find(|(k, _)| k == name) else {
            let suggestion = keys
                .iter()
                .map(|(k, _)| (strsim::jaro_winkler(k, name), k))
                .filter(|(score, _)| *score > 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, k)| k.clone());
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                line,
                key: name.to_string(),
                suggestion,
            });
        };
        let bad = |span: std::ops::Range<usize>, message: String| ConfigError::BadValue {
            path: path.to_path_buf(),
            line: line_of(Some(span)),
            key: name.to_string(),
            message,
        };
        let long = arg.get_long().unwrap_or(name);
        let flag = |v: &str| OsString::from(format!("--{long}={v}"));
        let args = match arg.get_action() {
            ArgAction::SetTrue => match value.get_ref() {
                DeValue::Boolean(true) => vec![OsString::from(format!("--{long}"))],
                DeValue::Boolean(false) => Vec::new(),
                v => {
                    return Err(bad(
                        value.span(),
                        format!("expected true or false, found {}", v.type_str()),
                    ));
                }
            },
            ArgAction::Set => vec![flag(&scalar(value).map_err(|m| bad(value.span(), m))?)],
            ArgAction::Append => {
                let Some(items) = value.get_ref().as_array() else {
                    return Err(bad(
                        value.span(),
                        format!(
                            "expected an array (the flag is repeatable), found {}; e.g. {name} = [\"...\"]",
                            value.get_ref().type_str()
                        ),
                    ));
                };
                let mut args = Vec::with_capacity(items.len());
                for item in items {
                    args.push(flag(&scalar(item).map_err(|m| bad(item.span(), m))?));
                }
                args
            }
            other => {
                return Err(bad(
                    value.span(),
                    format!("the flag --{long} cannot be set from a file ({other:?})"),
                ));
            }
        };
        out.push(Entry { key: name.to_string(), id: arg.get_id().to_string(), line, args });
    }
    Ok(out)
}

/// A value of a flag as its command-line text: strings as they are, numbers as written.
fn scalar(value: &Spanned<DeValue<'_>>) -> Result<String, String> {
    match value.get_ref() {
        DeValue::String(s) => Ok(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .map(|n| n.to_string())
            .map_err(|e| format!("{e}")),
        DeValue::Float(f) => Ok(f.as_str().to_string()),
        v => Err(format!("expected a string or a number, found {}", v.type_str())),
    }
}

/// Checks each entry's values with the flag's own parser (`cmd` parsing only that flag), so a
/// refused value is reported with its key and line rather than as a command-line error.
pub fn check(cmd: &clap::Command, path: &Path, entries: &[Entry]) -> Result<(), ConfigError> {
    for e in entries {
        let argv = std::iter::once(OsString::from(cmd.get_name())).chain(e.args.iter().cloned());
        if let Err(err) = cmd.clone().try_get_matches_from(argv) {
            let text = err.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            let message = first.strip_prefix("error: ").unwrap_or(first).trim().to_string();
            return Err(ConfigError::BadValue {
                path: path.to_path_buf(),
                line: e.line,
                key: e.key.clone(),
                message,
            });
        }
    }
    Ok(())
}
