//! Config errors, each pointing at the place in the file: `PATH:LINE:COL: message`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {message}")]
    Io { path: String, message: String },
    #[error("{path}:{line}:{col}: {message}")]
    Invalid {
        path: String,
        line: usize,
        col: usize,
        message: String,
    },
}

impl ConfigError {
    /// An error at byte offset `at` of `text`.
    pub fn at(path: &str, text: &str, at: usize, message: impl Into<String>) -> ConfigError {
        let (line, col) = line_col(text, at);
        ConfigError::Invalid {
            path: path.to_string(),
            line,
            col,
            message: message.into(),
        }
    }

    pub(crate) fn from_toml(path: &str, text: &str, e: &toml::de::Error) -> ConfigError {
        let at = e.span().map(|s| s.start).unwrap_or(0);
        ConfigError::at(path, text, at, e.message().trim().replace('\n', " "))
    }

    /// The message without its location.
    pub fn message(&self) -> &str {
        match self {
            ConfigError::Io { message, .. } | ConfigError::Invalid { message, .. } => message,
        }
    }

    /// `(line, col)`, 1-based, when the error has a place in the file.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Invalid { line, col, .. } => Some((*line, *col)),
            ConfigError::Io { .. } => None,
        }
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// Every error found in one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests {
    use super::line_col;

    #[test]
    fn line_and_column() {
        let t = "a = 1\nbb = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, 11), (2, 6));
    }
}
