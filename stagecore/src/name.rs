//! Validated names for environments, machines, disks, NICs, networks and snapshots.
//!
//! Names end up in file paths, domain names and VM names, so they are deliberately narrow:
//! 1–63 characters of ASCII letters, digits, `-`, `_` and `.`, not starting with `.` or `-`,
//! never containing `..`, `/` or control characters.

use crate::{Error, Result};

/// The longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Checks `name` and returns why it is not acceptable, if it is not.
///
/// ```
/// assert!(stagecore::name::check("web-1").is_ok());
/// assert!(stagecore::name::check("../x").is_err());
/// ```
pub fn check(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is {} bytes long; at most {MAX_NAME_LEN} are allowed", name.len()));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!("contains the control character {:?}", c));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(format!("{name:?} contains a path separator"));
    }
    if name.contains("..") {
        return Err(format!("{name:?} contains `..`"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!("{name:?} must not start with `.` or `-`"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("{name:?} contains {c:?}; use letters, digits, `-`, `_` and `.`"));
    }
    Ok(())
}

/// Validates `name`, reporting a failure as [`Error::InvalidSpec`] at `path`.
pub fn validate(path: &str, name: &str) -> Result<()> {
    check(name).map_err(|reason| Error::invalid(path, format!("name {reason}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["web", "app-1", "db_primary", "stage.2", "A9"] {
            assert!(check(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_dangerous_names() {
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for n in ["", "../x", "a/b", "..", ".hidden", "-flag", "tab\there", "nl\n", "sp ace", "é", long.as_str()] {
            assert!(check(n).is_err(), "{n:?} was accepted");
        }
    }

    #[test]
    fn validate_names_the_path() {
        let err = validate("machines[1].name", "a/b").unwrap_err();
        assert!(matches!(err, Error::InvalidSpec { ref path, .. } if path == "machines[1].name"), "{err}");
    }
}
