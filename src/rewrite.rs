//! Rewrite the URLs GitLab hands to clients (`X-Terraform-Get`, `Location`) so that every
//! follow-up request comes back through tfmirror.
//!
//! - Root-relative values (`/api/v4/...`) resolve against whatever URL the client used, which
//!   is tfmirror already. Only the upstream's relative URL root (a GitLab under `/gitlab`) is
//!   swapped for tfmirror's own path prefix.
//! - Absolute URLs on the upstream's origin become URLs on tfmirror's public base.
//! - Relative values (`./x`, `../x`) and foreign origins (object storage) are left alone:
//!   the former already resolve against tfmirror, and object storage is not GitLab.
//!
//! Values may carry GitLab's download JWT in their query: this module never logs them and
//! callers must not either.

use std::fmt;
use std::sync::Arc;

use http::uri::Authority;
use url::Url;

/// Where clients reach tfmirror: `scheme://authority` plus an optional path prefix.
///
/// Made for every request that has no configured `public_url` (from its `Host`), so it is
/// cheap to make: the parts are kept, and joined only where a URL is written (downloads and
/// rewrites; a listing hit never needs one). A configured one is shared, not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicBase {
    /// A configured `public_url`: (origin, prefix).
    Configured(Arc<(String, String)>),
    /// The request's own scheme and `Host`: no path prefix.
    Request {
        scheme: &'static str,
        authority: Authority,
    },
}

impl PublicBase {
    /// From a configured `public_url`.
    pub fn from_url(url: &Url) -> Self {
        PublicBase::Configured(Arc::new((
            url.origin().ascii_serialization(),
            url.path().trim_end_matches('/').to_string(),
        )))
    }

    /// From the request itself, when no `public_url` is configured. The authority must not
    /// carry user information (the caller refuses one with `@`).
    pub fn from_request(scheme: &'static str, authority: Authority) -> Self {
        PublicBase::Request { scheme, authority }
    }

    /// `scheme://host[:port]`, no trailing slash.
    pub fn origin(&self) -> Origin<'_> {
        Origin(self)
    }

    /// Empty, or a path prefix such as `/mirror`, no trailing slash.
    pub fn prefix(&self) -> &str {
        match self {
            PublicBase::Configured(c) => &c.1,
            PublicBase::Request { .. } => "",
        }
    }
}

/// A [`PublicBase`]'s origin, written out where a URL is built.
pub struct Origin<'a>(&'a PublicBase);

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            PublicBase::Configured(c) => f.write_str(&c.0),
            PublicBase::Request { scheme, authority } => write!(f, "{scheme}://{authority}"),
        }
    }
}

/// Knows the upstream's origin and relative URL root.
#[derive(Debug, Clone)]
pub struct Rewriter {
    upstream: url::Origin,
    upstream_prefix: String,
}

impl Rewriter {
    pub fn new(upstream: &Url) -> Self {
        Rewriter {
            upstream: upstream.origin(),
            upstream_prefix: upstream.path().trim_end_matches('/').to_string(),
        }
    }

    /// Strip the upstream's relative URL root from a path, at a segment boundary.
    fn strip_upstream_prefix<'a>(&self, path: &'a str) -> Option<&'a str> {
        let rest = path.strip_prefix(self.upstream_prefix.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }

    /// The value to send to the client, or `None` to keep `value` unchanged.
    pub fn rewrite(&self, value: &str, public: &PublicBase) -> Option<String> {
        if value.starts_with('/') && !value.starts_with("//") {
            let rest = self.strip_upstream_prefix(value)?;
            let out = format!("{}{}", public.prefix(), rest);
            return (out != value).then_some(out);
        }
        let absolute = if value.starts_with("//") {
            // Scheme-relative: it inherits the scheme of the upstream response.
            Url::parse(&format!("{}:{value}", self.upstream_scheme())).ok()?
        } else {
            Url::parse(value).ok()?
        };
        if absolute.origin() != self.upstream {
            return None;
        }
        let rest = self.strip_upstream_prefix(absolute.path())?;
        let mut out = format!("{}{}{}", public.origin(), public.prefix(), rest);
        if let Some(q) = absolute.query() {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }

    fn upstream_scheme(&self) -> &str {
        match &self.upstream {
            url::Origin::Tuple(scheme, _, _) => scheme,
            url::Origin::Opaque(_) => "https",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(upstream: &str) -> Rewriter {
        Rewriter::new(&Url::parse(upstream).unwrap())
    }

    fn local() -> PublicBase {
        PublicBase::from_request("http", "127.0.0.1:8080".parse().unwrap())
    }

    const FILE: &str =
        "/api/v4/packages/terraform/modules/v1/g/n/s/1.0.0/file?token=abc&archive=tgz";

    #[test]
    fn root_relative_stays_relative() {
        assert_eq!(rw("https://gitlab.com").rewrite(FILE, &local()), None);
    }

    #[test]
    fn relative_url_root_is_swapped() {
        let r = rw("https://example.com/gitlab/");
        let v = format!("/gitlab{FILE}");
        assert_eq!(r.rewrite(&v, &local()).as_deref(), Some(FILE));
        // A path merely starting with the same letters is not under the prefix.
        assert_eq!(r.rewrite("/gitlabx/a", &local()), None);
        let public = PublicBase::from_url(&Url::parse("https://mirror.example/tf/").unwrap());
        assert_eq!(r.rewrite(&v, &public), Some(format!("/tf{FILE}")));
    }

    #[test]
    fn absolute_upstream_urls_move_to_tfmirror() {
        let r = rw("https://gitlab.example.com");
        let v = "https://gitlab.example.com/api/v4/projects/1/packages/terraform/modules/n/s/1.0.0?archive=tgz";
        assert_eq!(
            r.rewrite(v, &local()).unwrap(),
            "http://127.0.0.1:8080/api/v4/projects/1/packages/terraform/modules/n/s/1.0.0?archive=tgz"
        );
        // Default ports compare equal to implicit ones.
        let v443 = "https://gitlab.example.com:443/x";
        assert_eq!(
            r.rewrite(v443, &local()).unwrap(),
            "http://127.0.0.1:8080/x"
        );
        let scheme_relative = "//gitlab.example.com/x";
        assert_eq!(
            r.rewrite(scheme_relative, &local()).unwrap(),
            "http://127.0.0.1:8080/x"
        );
    }

    #[test]
    fn foreign_and_relative_values_are_untouched() {
        let r = rw("https://gitlab.example.com");
        for v in [
            "https://s3.example.com/bucket/obj?X-Amz-Signature=x",
            "http://gitlab.example.com/x", // another scheme is another origin
            "https://gitlab.example.com:8443/x",
            "./file?token=x",
            "../1.0.0/file",
            "not a url",
        ] {
            assert_eq!(r.rewrite(v, &local()), None, "{v}");
        }
    }
}
