//! The `tls` tables: a route's (`tls = { .. }` beside an `https://` upstream), `[redis] tls` and
//! `[server] tls`. Files are read here, relative to the config file's directory, so `corral
//! validate` proves they exist, parse and belong together; a message names the file, never its
//! contents.

use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use toml::Spanned;

use super::{At, Checked, Checker};
use crate::config::raw::{RawListenerTls, RawRedisTls, RawUpstreamTls};
use crate::config::tls::{DEFAULT_HANDSHAKE_TIMEOUT, ListenerTls, RedisTls, UpstreamTls};
use crate::tls::{Identity, Roots};

impl Checker<'_> {
    /// A path as written, relative to the config file's directory.
    fn tls_path(&self, v: &Spanned<String>) -> PathBuf {
        let path = PathBuf::from(v.get_ref());
        match self.source.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path,
        }
    }

    fn roots(&self, v: &Spanned<String>, at: At<'_>) -> Checked<Roots> {
        Roots::load(&self.tls_path(v)).map_err(|err| self.error(v.span(), at, err))
    }

    /// A certificate and its key, both given or neither; `prefix` is what the fields are called
    /// (`client_` or ``) and `table` where they live (`tls.` or `redis.tls.`).
    fn identity(
        &self,
        pair: (&Option<Spanned<String>>, &Option<Spanned<String>>),
        table: (std::ops::Range<usize>, Option<&str>, &str),
        prefix: &str,
    ) -> Checked<Option<Identity>> {
        let (span, route, dotted) = table;
        let cert_field = format!("{dotted}{prefix}cert_file");
        let key_field = format!("{dotted}{prefix}key_file");
        match pair {
            (None, None) => Ok(None),
            (Some(_), None) => {
                let why = format!("`{prefix}cert_file` needs `{prefix}key_file` too");
                self.fail(span, (route, &key_field), why)
            }
            (None, Some(_)) => {
                let why = format!("`{prefix}key_file` needs `{prefix}cert_file` too");
                self.fail(span, (route, &cert_field), why)
            }
            (Some(cert), Some(key)) => {
                let loaded = Identity::load(&self.tls_path(cert), &self.tls_path(key));
                loaded.map(Some).map_err(|err| {
                    // A fault in the key file points at the key's line.
                    let at_key = matches!(
                        err,
                        crate::tls::TlsFileError::NoKey { .. }
                            | crate::tls::TlsFileError::UnsupportedKey { .. }
                    ) || matches!(&err, crate::tls::TlsFileError::Read { path, .. }
                        if *path == self.tls_path(key));
                    match at_key {
                        true => self.error(key.span(), (route, &key_field), err),
                        false => self.error(cert.span(), (route, &cert_field), err),
                    }
                })
            }
        }
    }

    /// A route's `tls = { .. }`; its upstream must be `https://`.
    pub(super) fn upstream_tls(
        &self,
        raw: &Spanned<RawUpstreamTls>,
        route: &str,
        upstream: &Uri,
    ) -> Checked<UpstreamTls> {
        let at = |field| (Some(route), field);
        if upstream.scheme_str() != Some("https") {
            let why = "`tls` applies to an https:// upstream only";
            return self.fail(raw.span(), at("tls"), why);
        }
        let table = raw.get_ref();
        let roots = table
            .ca_file
            .as_ref()
            .map(|v| self.roots(v, at("tls.ca_file")));
        let server_name = match &table.server_name {
            None => None,
            Some(name) => match rustls_pki_types::ServerName::try_from(name.get_ref().as_str()) {
                Ok(_) => Some(name.get_ref().clone()),
                Err(_) => {
                    let why = format!(
                        "invalid server name {:?} (a DNS name or an IP address)",
                        name.get_ref()
                    );
                    return self.fail(name.span(), at("tls.server_name"), why);
                }
            },
        };
        let pair = (&table.client_cert_file, &table.client_key_file);
        let identity = self.identity(pair, (raw.span(), Some(route), "tls."), "client_")?;
        let timeout = &table.handshake_timeout;
        let handshake_timeout: Duration = self.positive(
            timeout,
            DEFAULT_HANDSHAKE_TIMEOUT,
            at("tls.handshake_timeout"),
        )?;
        Ok(UpstreamTls {
            roots: roots.transpose()?,
            server_name,
            identity,
            handshake_timeout,
        })
    }

    /// `[redis] tls = { .. }`; `tls_urls`: whether any configured URL is `rediss://`.
    pub(super) fn redis_tls(
        &self,
        raw: &Spanned<RawRedisTls>,
        tls_urls: bool,
    ) -> Checked<RedisTls> {
        let at = |field| (None, field);
        if !tls_urls {
            let why = "`redis.tls` applies to rediss:// URLs; none is configured";
            return self.fail(raw.span(), at("redis.tls"), why);
        }
        let table = raw.get_ref();
        let roots = table
            .ca_file
            .as_ref()
            .map(|v| self.roots(v, at("redis.tls.ca_file")));
        let pair = (&table.client_cert_file, &table.client_key_file);
        let identity = self.identity(pair, (raw.span(), None, "redis.tls."), "client_")?;
        Ok(RedisTls {
            roots: roots.transpose()?,
            identity,
        })
    }

    /// `[server] tls = { cert_file, key_file }`: both required.
    pub(super) fn listener_tls(&self, raw: &Spanned<RawListenerTls>) -> Checked<ListenerTls> {
        let table = raw.get_ref();
        if table.cert_file.is_none() && table.key_file.is_none() {
            let why = "required: the listener's certificate (and `key_file`)";
            return self.fail(raw.span(), (None, "server.tls.cert_file"), why);
        }
        let pair = (&table.cert_file, &table.key_file);
        let identity = self.identity(pair, (raw.span(), None, "server.tls."), "")?;
        match identity {
            Some(identity) => Ok(ListenerTls { identity }),
            // Both absent was refused above.
            None => self.fail(
                raw.span(),
                (None, "server.tls"),
                "required: cert_file and key_file",
            ),
        }
    }
}
