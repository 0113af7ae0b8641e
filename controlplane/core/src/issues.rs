//! What a configuration file can be wrong with: [`ConfigIssue`] (one problem, naming the file, the field and
//! the reason) and [`ConfigError`] (every problem found in one file), shared by the gateway config
//! ([`crate::config`]) and the price sheet and `[pricing]` section ([`crate::pricing`]), so both report
//! problems the same way and neither depends on the other for it.
//!
//! Owns: the two types, the collector validators push issues into, and the reading of a TOML syntax error
//! as an issue. Fails: never. Cost: one allocation per issue.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The file the problem is in.
    pub file: PathBuf,
    /// Dotted path of the offending field, e.g. `routes[2].provider`; empty for whole-file problems.
    pub field: String,
    /// What is wrong, in words an operator can act on.
    pub reason: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.reason
            )
        }
    }
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// At least one issue.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

/// The issues one validator collects for one file.
pub(crate) struct Issues<'a> {
    pub(crate) file: &'a Path,
    pub(crate) list: Vec<ConfigIssue>,
}

impl Issues<'_> {
    pub(crate) fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.list.push(ConfigIssue {
            file: self.file.to_owned(),
            field: field.into(),
            reason: reason.into(),
        });
    }
}

/// A TOML syntax or type error in `text` (read from `path`) as an issue, with its line number.
pub(crate) fn toml_issue(path: &Path, text: &str, e: &toml::de::Error) -> ConfigIssue {
    let mut reason = e.message().to_owned();
    if let Some(span) = e.span() {
        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
        reason = format!("line {line}: {reason}");
    }
    ConfigIssue {
        file: path.to_owned(),
        field: String::new(),
        reason,
    }
}
