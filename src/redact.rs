//! Secrets kept out of logs and error messages: the password of a URL's userinfo
//! (`redis://:s3cret@host:6379`) is replaced by `***` wherever a URL is shown — config errors
//! (which `POST /reload` also returns), and log lines naming a Redis node.
//!
//! It works on any text, not only on a well-formed URL, because the text to show is often the very
//! value that failed to parse: a URL whose `://` was mistyped (`redis//:s3cret@host`,
//! `redis:/:s3cret@host`) still has its credentials masked — everything before the `@` of a word
//! that holds a `:` or `/` before it, after its scheme letters.

use std::borrow::Cow;

/// What a password is shown as.
const MASK: &str = "***";

/// `text` with the password of every `scheme://user:password@` in it replaced by `***` (the user
/// name is kept: it helps tell nodes apart and is not a secret; `scheme://user@host` is shown as
/// it is). Text without a password is
/// returned as it is, without a copy.
pub fn redact(text: &str) -> Cow<'_, str> {
    match redact_urls(text) {
        Cow::Borrowed(text) => redact_malformed(text),
        Cow::Owned(text) => Cow::Owned(redact_malformed(&text).into_owned()),
    }
}

/// Masks the credentials of words that look like a URL with userinfo but have no `://`:
/// `redis//:pw@h`, `redis:pw@h`, `//user:pw@h`. Words with `://` were handled by [`redact_urls`];
/// an e-mail address (`a@b`, nothing of `:` or `/` before the `@`) is left alone.
fn redact_malformed(text: &str) -> Cow<'_, str> {
    let is_break = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`');
    let mut out = String::new();
    let mut changed = false;
    let mut start = 0;
    for (i, c) in text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
    {
        if !is_break(c) {
            continue;
        }
        let word = &text[start..i];
        let masked = (!word.contains("://"))
            .then(|| word.rfind('@'))
            .flatten()
            .filter(|&at| word[..at].contains([':', '/']))
            .map(|at| {
                let scheme = word
                    .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
                    .unwrap_or(0)
                    .min(at);
                format!("{}{MASK}{}", &word[..scheme], &word[at..])
            });
        match masked {
            Some(masked) => {
                out.push_str(&masked);
                changed = true;
            }
            None => out.push_str(word),
        }
        if i < text.len() {
            out.push(c);
        }
        start = i + c.len_utf8();
    }
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(text)
    }
}

/// The `scheme://user:password@` pass of [`redact`].
fn redact_urls(text: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut rest = text;
    let mut changed = false;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        let tail = &rest[authority_start..];
        // The authority ends at the first character that cannot be in it (RFC 3986: `/`, `?`,
        // `#`), or at whitespace or a quote, as the URL is often embedded in a message.
        let authority_len = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..authority_len];
        let userinfo = authority
            .rfind('@')
            .map(|at| (&authority[..at], &authority[at..]));
        match userinfo.and_then(|(info, host)| Some((info.split_once(':')?.0, host))) {
            Some((user, host)) => {
                out.push_str(&rest[..authority_start]);
                out.push_str(user);
                out.push(':');
                out.push_str(MASK);
                out.push_str(host);
                changed = true;
            }
            None => out.push_str(&rest[..authority_start + authority_len]),
        }
        rest = &tail[authority_len..];
    }
    if !changed {
        return Cow::Borrowed(text);
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_the_rest_kept() {
        let cases = [
            (
                "redis://:s3cret@10.0.0.1:6379/0",
                "redis://:***@10.0.0.1:6379/0",
            ),
            ("rediss://app:s3cret@h:6380", "rediss://app:***@h:6380"),
            (
                "\"redis://:a@b:1\" is listed twice; see redis://:c@d",
                "\"redis://:***@b:1\" is listed twice; see redis://:***@d",
            ),
            ("redis://:p@ss:w@rd@h:1", "redis://:***@h:1"),
        ];
        for (text, shown) in cases {
            assert_eq!(redact(text), shown, "{text}");
            assert!(!redact(text).contains("s3cret"));
        }
    }

    #[test]
    fn credentials_of_a_mistyped_url_are_masked_too() {
        let cases = [
            (
                "\"redis//:s3cret@127.0.0.1:6379\" must start with redis://",
                "\"redis***@127.0.0.1:6379\" must start with redis://",
            ),
            ("redis:/:s3cret@h:1", "redis***@h:1"),
            ("redis:app:s3cret@h", "redis***@h"),
            ("//app:s3cret@h/0", "***@h/0"),
            ("see `rediss//u:s3cret@h`.", "see `rediss***@h`."),
        ];
        for (text, shown) in cases {
            assert_eq!(redact(text), shown, "{text}");
        }
    }

    #[test]
    fn text_without_a_password_is_not_copied() {
        for text in [
            "redis://h:6379",
            "http://127.0.0.1:5000/x?a=b@c",
            "no url",
            "a://",
            "://@",
            "redis://user@h",
            "write to ops@example.com",
            "a @ b",
        ] {
            assert!(matches!(redact(text), Cow::Borrowed(_)), "{text}");
        }
    }
}
