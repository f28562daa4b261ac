//! Secrets kept out of the file: the admin token and the Redis password may be written in the
//! TOML, read from a file (`admin_token_file`, `password_file`: Kubernetes mounts a Secret as
//! files) or from an environment variable (`admin_token_env`, `password_env`). At most one of
//! the three for each. A file's path is relative to the config file's directory; its content is
//! the secret with trailing newlines and spaces trimmed (as `echo … > file` leaves them).
//!
//! Messages name the file, line and field of the option, never the secret. A secret is read when
//! the config is loaded, so a reload (`POST /reload`) reads it again.

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::{Checked, Checker};

/// Where one secret may come from: the value in the file, a file, or an environment variable,
/// each with the dotted name of its field.
pub(super) struct SecretSources<'r> {
    pub(super) value: (Option<&'r Spanned<String>>, &'r str),
    pub(super) file: (Option<&'r Spanned<String>>, &'r str),
    pub(super) env: (Option<&'r Spanned<String>>, &'r str),
}

impl Checker<'_> {
    /// The secret, from whichever one source is given; `None` when none is.
    pub(super) fn secret(&self, sources: SecretSources<'_>) -> Checked<Option<String>> {
        let given: Vec<_> = [sources.value, sources.file, sources.env]
            .into_iter()
            .filter_map(|(v, field)| v.map(|v| (v, field)))
            .collect();
        if let [(_, first), (second, field), ..] = given.as_slice() {
            let why = format!("give only one of `{first}` and `{field}`");
            return self.fail(second.span(), (None, field), why);
        }
        let Some((given, field)) = given.first() else {
            return Ok(None);
        };
        let at = (None, *field);
        let text = given.get_ref();
        let secret = if *field == sources.value.1 {
            text.clone()
        } else if *field == sources.file.1 {
            let path = self.beside_config(text);
            match std::fs::read_to_string(&path) {
                Ok(content) => content.trim_end().to_owned(),
                Err(err) => {
                    let why = format!("cannot read {}: {err}", path.display());
                    return self.fail(given.span(), at, why);
                }
            }
        } else {
            match std::env::var(text) {
                Ok(value) => value,
                Err(std::env::VarError::NotPresent) => {
                    let why = format!("the environment variable {text:?} is not set");
                    return self.fail(given.span(), at, why);
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    let why = format!("the environment variable {text:?} is not UTF-8");
                    return self.fail(given.span(), at, why);
                }
            }
        };
        if secret.is_empty() {
            let what = if *field == sources.value.1 {
                "the value"
            } else {
                "the secret it gives"
            };
            let why = format!("{what} is empty (omit the option to go without)");
            return self.fail(given.span(), at, why);
        }
        Ok(Some(secret))
    }

    /// `path` as written in the config: relative to the config file's directory.
    fn beside_config(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        match self.source.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }
}

/// `url` with `password` as the password of its userinfo (percent-encoded), keeping its user
/// name; `None` when the URL has a password already or no authority to put one in.
pub(super) fn with_password(url: &str, password: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (user, host) = match authority.rsplit_once('@') {
        Some((info, _)) if info.contains(':') => return None,
        Some((user, host)) => (user, host),
        None => ("", authority),
    };
    if host.is_empty() {
        return None;
    }
    let encoded =
        percent_encoding::utf8_percent_encode(password, percent_encoding::NON_ALPHANUMERIC);
    Some(format!("{scheme}://{user}:{encoded}@{host}{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_joins_the_userinfo_encoded() {
        assert_eq!(
            with_password("redis://h:6379/0", "p@ss w").as_deref(),
            Some("redis://:p%40ss%20w@h:6379/0")
        );
        assert_eq!(
            with_password("rediss://app@h:6380", "s").as_deref(),
            Some("rediss://app:s@h:6380")
        );
        assert_eq!(
            with_password("redis://:x@h:1", "s"),
            None,
            "has one already"
        );
        assert_eq!(with_password("redis://", "s"), None, "no host");
    }
}
