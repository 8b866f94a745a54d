//! Responses tfmirror writes itself, in GitLab's shapes.

use bytes::Bytes;
use http::StatusCode;
use pingora::http::ResponseHeader;
use pingora::Result;

/// A response as a value: what to answer, decided before anything is written. Handlers
/// build one; [`write()`] alone turns it into bytes on the session, so every answer gets the
/// same framing, HEAD handling and cut-on-error.
pub struct Reply {
    pub status: StatusCode,
    /// A reason phrase other than the status's canonical one (Terraform prints only the
    /// status line of a failed registry call, so tfmirror's 503s explain themselves there).
    pub reason: Option<String>,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub body: Body,
}

/// The body of a [`Reply`].
pub enum Body {
    /// Known whole: sent with `Content-Length` (omitted for 204 and 304).
    Full(Bytes),
    /// Streamed (a verified blob, a fill, a pass-through); `len` when known. An error from
    /// the stream cuts the response, framed so that the client sees the cut ([`framing`]).
    Stream {
        len: Option<u64>,
        chunks: BodyStream,
    },
    /// A file already checked whole (`cache::whole`), `len` bytes long: sent with
    /// `Content-Length`, by the kernel where the connection allows (`edge::write`).
    File {
        len: u64,
        file: std::sync::Arc<std::fs::File>,
    },
}

/// The chunks of a streamed body; an `Err` is its last item, and ends the response as
/// broken (why, for the logs).
pub type BodyStream = futures::stream::BoxStream<'static, std::result::Result<Bytes, BodyCut>>;

/// Why a streamed body stopped before its end.
pub type BodyCut = Box<dyn std::error::Error + Send + Sync>;

#[cfg(test)]
impl Body {
    /// The body as a client reads it: the bytes, and whether it was cut.
    pub async fn read_all(self) -> (Vec<u8>, bool) {
        use futures::StreamExt;
        match self {
            Body::Full(b) => (b.to_vec(), false),
            Body::Stream { mut chunks, .. } => {
                let mut out = Vec::new();
                while let Some(chunk) = chunks.next().await {
                    match chunk {
                        Ok(c) => out.extend_from_slice(&c),
                        Err(_) => return (out, true),
                    }
                }
                (out, false)
            }
            Body::File { len, file } => {
                let mut out = vec![0; usize::try_from(len).expect("a test-sized file")];
                let read = std::os::unix::fs::FileExt::read_exact_at(&*file, &mut out, 0);
                (out, read.is_err())
            }
        }
    }
}

impl Reply {
    /// A complete answer with a body known whole.
    pub fn full(status: StatusCode, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            reason: None,
            headers: Vec::new(),
            body: Body::Full(body.into()),
        }
    }

    /// A streamed answer (status 200).
    pub fn stream(len: Option<u64>, chunks: BodyStream) -> Reply {
        Reply::ok(Body::Stream { len, chunks })
    }

    /// A 200 with `body`, whatever its kind.
    pub fn ok(body: Body) -> Reply {
        Reply {
            status: StatusCode::OK,
            reason: None,
            headers: Vec::new(),
            body,
        }
    }

    /// A JSON answer tfmirror writes itself (never cached by clients: `no-store`).
    pub fn json(status: StatusCode, body: String) -> Reply {
        Reply::full(status, body)
            .with(http::header::CONTENT_TYPE, JSON)
            .with(http::header::CACHE_CONTROL, "no-store")
    }

    /// GitLab's error shape for `status`, e.g. `{"message":"502 Bad Gateway"}`.
    pub fn error(status: StatusCode) -> Reply {
        Reply::json(status, message_body(status))
    }

    /// A GitLab-shaped error for a registry route, saying what the cache did (every registry
    /// answer carries `X-Cache-Status`, tfmirror's own refusals and 502s included).
    pub fn registry_error(status: StatusCode, cache: CacheStatus) -> Reply {
        Reply::error(status).cache(cache)
    }

    /// Add a header from a static value.
    pub fn with(mut self, name: http::HeaderName, value: &'static str) -> Reply {
        self.headers
            .push((name, http::HeaderValue::from_static(value)));
        self
    }

    /// Add a header value taken as is.
    pub fn with_value(mut self, name: http::HeaderName, value: http::HeaderValue) -> Reply {
        self.headers.push((name, value));
        self
    }

    /// Add a header from text; text that is no header value (never expected: callers build
    /// it from validated parts) leaves the header out rather than fail the answer.
    pub fn with_text(self, name: http::HeaderName, value: &str) -> Reply {
        match http::HeaderValue::from_str(value) {
            Ok(v) => self.with_value(name, v),
            Err(_) => {
                tracing::error!(header = %name, "dropped a header value that is not one");
                self
            }
        }
    }

    /// `X-Cache-Status`.
    pub fn cache(self, cache: CacheStatus) -> Reply {
        self.with(CACHE_STATUS, cache.as_str())
    }

    /// A JSON body `age` seconds old (from the cache, or fetched now); a `stale` one carries
    /// `Warning: 110`. The shape of every cached listing and provider list answer.
    pub fn cached_json(cache: CacheStatus, age: u64, stale: bool, body: impl Into<Bytes>) -> Reply {
        let reply = Reply::full(StatusCode::OK, body)
            .with(http::header::CONTENT_TYPE, JSON)
            .cache(cache)
            .with_value(http::header::AGE, decimal(age));
        reply.marked_stale(stale)
    }

    /// A download answer: 204 whose `X-Terraform-Get` is `location`; a stale one says so.
    pub fn terraform_get(cache: CacheStatus, location: &str) -> Reply {
        Reply::full(StatusCode::NO_CONTENT, Bytes::new())
            .with_text(TERRAFORM_GET, location)
            .cache(cache)
            .marked_stale(cache == CacheStatus::Stale)
    }

    /// `Warning: 110` when `stale`.
    pub fn marked_stale(self, stale: bool) -> Reply {
        if stale {
            self.with(http::header::WARNING, STALE_WARNING)
        } else {
            self
        }
    }

    /// Replace `X-Cache-Status` (a hit that the caller's standing makes stale).
    pub fn restamp(mut self, cache: CacheStatus) -> Reply {
        self.headers.retain(|(n, _)| n != CACHE_STATUS);
        self.cache(cache)
    }

    /// A reason phrase of its own; non-printable characters become `?` so that the status
    /// line can never break.
    pub fn reason(mut self, reason: &str) -> Reply {
        let clean = reason
            .chars()
            .map(|c| {
                if c == ' ' || c.is_ascii_graphic() {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        self.reason = Some(clean);
        self
    }

    /// The body, when it is known whole (for tests; a stream is not read here).
    pub fn full_body(&self) -> Option<&Bytes> {
        match &self.body {
            Body::Full(b) => Some(b),
            Body::Stream { .. } | Body::File { .. } => None,
        }
    }

    /// The first value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.to_str().ok())
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = match &self.body {
            Body::Full(b) => format!("{} bytes", b.len()),
            Body::Stream { len, .. } => format!("stream of {len:?} bytes"),
            Body::File { len, .. } => format!("file of {len} bytes"),
        };
        // Header values can carry secrets (`X-Terraform-Get` holds a download token): only
        // the names, and the cache status, go into a debug line or an assertion message.
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(n, v)| match n {
                n if *n == CACHE_STATUS => format!("{n}: {}", v.to_str().unwrap_or("?")),
                n => n.to_string(),
            })
            .collect();
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("reason", &self.reason)
            .field("headers", &headers)
            .field("body", &body)
            .finish()
    }
}

/// The content type of every JSON answer.
pub const JSON: &str = "application/json";
/// RFC 7234's warning on a stale answer, beside `X-Cache-Status: STALE`.
pub const STALE_WARNING: &str = "110 - \"Response is Stale\"";
/// Where Terraform is to fetch a module's source from (a download answer's header).
pub const TERRAFORM_GET: http::HeaderName = http::HeaderName::from_static("x-terraform-get");

/// A head for tfmirror's own answers, without pingora's case map (`build_no_case`).
///
/// The case map keeps each header name as it was given, to write it back so; it costs two
/// allocations per head, plus a shared copy of every name pingora has no titled form for.
/// Names here are only ever [`http::HeaderName`]s ([`Reply::headers`]), which are lowercase,
/// and pingora writes such a name the same way with or without the map: its titled form if
/// it has one (`Content-Type`), otherwise as it is (`x-cache-status`).
/// `tests::heads_write_the_same_names_without_the_case_map` checks that for every name used
/// here, and `tests/operate.rs` pins the names on the wire. A `&str` name in another case
/// would lose its case here: give names as `HeaderName`s.
fn new_head(status: StatusCode, size_hint: usize) -> Result<ResponseHeader> {
    ResponseHeader::build_no_case(status, Some(size_hint))
}

/// The head [`write()`] sends for `reply`, but for a streamed body's framing (which depends on
/// the request), and the body: status, reason, headers in order, then `Content-Length` of a
/// body known whole (none on 204 and 304).
pub fn head(reply: Reply) -> Result<(Box<ResponseHeader>, Body)> {
    let Reply {
        status,
        reason,
        headers,
        body,
    } = reply;
    let mut h = new_head(status, headers.len() + 2)?;
    if let Some(r) = &reason {
        h.set_reason_phrase(Some(r))?;
    }
    let mut said_cache_status = false;
    for (name, value) in headers {
        said_cache_status |= name == CACHE_STATUS;
        h.append_header(name, value)?;
    }
    // Every answer says how the cache took part; tfmirror's own answers that are no cache
    // decision (discovery, the local endpoints, refusals before any lookup) bypass it.
    if !said_cache_status {
        h.append_header(CACHE_STATUS, CacheStatus::Bypass.as_str())?;
    }
    let known = match &body {
        Body::Full(bytes) => Some(bytes.len() as u64),
        Body::File { len, .. } => Some(*len),
        Body::Stream { .. } => None,
    };
    if let Some(len) = known {
        if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
            h.insert_header(http::header::CONTENT_LENGTH, decimal(len))?;
        }
    }
    Ok((Box::new(h), body))
}

/// Numbers below this have their decimal text in [`SMALL_DECIMALS`].
const SMALL: u64 = 10_000;

/// The decimal text of 0 to 9999 back to back, "0123456789101112…9999": header values
/// point into it. Built at compile time.
static SMALL_DECIMALS: [u8; 38_890] = small_decimals();

const fn small_decimals() -> [u8; 38_890] {
    let mut out = [0u8; 38_890];
    let (mut n, mut at) = (0, 0);
    while n < SMALL {
        let (start, end) = small_span(n);
        let mut i = end;
        let mut rest = n;
        while i > start {
            i -= 1;
            out[i] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        at += end - start;
        n += 1;
    }
    assert!(at == out.len());
    out
}

/// Where `n` (below [`SMALL`]) is in [`SMALL_DECIMALS`]: the numbers of one width follow
/// those of the width before.
const fn small_span(n: u64) -> (usize, usize) {
    let (first, width, offset) = match n {
        0..=9 => (0, 1, 0),
        10..=99 => (10, 2, 10),
        100..=999 => (100, 3, 190),
        _ => (1000, 4, 2890),
    };
    let start = offset + (n - first) as usize * width;
    (start, start + width)
}

/// A number as a header value (`Age`, `Content-Length`). `HeaderValue::from(n)` costs two
/// allocations (a buffer, then shrinking it); below 10,000 (listing ages in seconds, most
/// listing lengths) this costs none, and one above.
pub fn decimal(n: u64) -> http::HeaderValue {
    if n < SMALL {
        let (start, end) = small_span(n);
        if let Ok(text) = std::str::from_utf8(&SMALL_DECIMALS[start..end]) {
            return http::HeaderValue::from_static(text);
        }
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut rest = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    // Exactly sized: no second allocation to shrink it.
    http::HeaderValue::from_maybe_shared(Bytes::copy_from_slice(&digits[i..]))
        .unwrap_or_else(|_| http::HeaderValue::from(n))
}

/// GitLab's error shape for statuses it reports with `message`: `{"message":"502 Bad Gateway"}`.
/// The versions a listing body shows: `modules[0].versions[].version`, as Terraform reads it.
pub fn listed_versions(body: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["modules"][0]["versions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["version"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn message_body(status: StatusCode) -> String {
    let text = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    serde_json::json!({ "message": text }).to_string()
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length`.
    Length(u64),
    /// HTTP/1.1 `Transfer-Encoding: chunked`: a cut leaves no terminal chunk, so the client
    /// sees an error, never a short body that looks whole.
    Chunked,
    /// HTTP/2 (and later) frames: END_STREAM marks the end, a reset is an error.
    Frames,
    /// HTTP/1.0 cannot take chunked: the body ends when the connection closes, so the
    /// connection is not kept alive, and the case is counted (a cut looks like the end there).
    Close,
}

/// The framing of a body of length `len` (None: unknown until it ends) for a request of
/// `version`. Pingora frames by the headers it is given and falls back to close-delimited
/// (while still announcing keep-alive) when there is neither length nor chunking.
pub fn framing(version: http::Version, len: Option<u64>) -> Framing {
    match (len, version) {
        (Some(n), _) => Framing::Length(n),
        (None, v) if v >= http::Version::HTTP_2 => Framing::Frames,
        (None, http::Version::HTTP_11) => Framing::Chunked,
        (None, _) => Framing::Close,
    }
}

/// The cache status header, like nginx's `$upstream_cache_status`.
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("x-cache-status");

/// What the cache did for a registry response (the value of `X-Cache-Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the cache; the upstream was not asked.
    Hit,
    /// Not in the cache (or not for this caller): fetched from the upstream.
    Miss,
    /// The caller's grant had to be re-checked upstream; the body was unchanged.
    Revalidated,
    /// Served from the cache while a background refresh runs (stale-while-revalidate).
    Updating,
    /// Served from the cache because the upstream failed (stale-if-error).
    Stale,
    /// Not cacheable (uploads, project routes, redirects): passed through.
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Revalidated => "REVALIDATED",
            CacheStatus::Updating => "UPDATING",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replys_debug_form_shows_no_header_value_but_the_cache_status() {
        let token = "sealed-download-token";
        let reply = Reply::full(StatusCode::NO_CONTENT, Bytes::new())
            .with_text(
                http::HeaderName::from_static("x-terraform-get"),
                &format!("/file?token={token}"),
            )
            .cache(CacheStatus::Hit);
        let shown = format!("{reply:?}");
        assert!(!shown.contains(token), "{shown}");
        assert!(shown.contains("x-terraform-get") && shown.contains("x-cache-status: HIT"));
    }
    use http::Version;

    /// Every name tfmirror's own heads carry (and those pingora adds: `Date`, `Connection`)
    /// goes on the wire in the same case with and without the case map.
    #[test]
    fn heads_write_the_same_names_without_the_case_map() {
        use http::header;
        let names = [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::CACHE_CONTROL,
            header::AGE,
            header::WARNING,
            header::WWW_AUTHENTICATE,
            header::RETRY_AFTER,
            header::TRANSFER_ENCODING,
            header::LOCATION,
            header::ETAG,
            header::LAST_MODIFIED,
            header::CONTENT_ENCODING,
            header::DATE,
            header::CONNECTION,
            header::SERVER,
            CACHE_STATUS,
            http::HeaderName::from_static("x-terraform-get"),
            http::HeaderName::from_static("x-tfmirror-refusal"),
        ];
        let wire = |mut h: ResponseHeader| {
            for name in &names {
                h.append_header(name.clone(), "v").unwrap();
            }
            let mut out = Vec::new();
            h.header_to_h1_wire(&mut out);
            String::from_utf8(out).unwrap()
        };
        let with_map = wire(ResponseHeader::build(StatusCode::OK, None).unwrap());
        let without = wire(new_head(StatusCode::OK, 0).unwrap());
        assert_eq!(without, with_map);
        assert!(with_map.starts_with("Content-Type: v\r\nContent-Length: v\r\n"));
        assert!(with_map.contains("\r\nx-cache-status: v\r\n"));
    }

    #[test]
    fn decimal_header_values_are_the_numbers() {
        for n in (0..20_000).chain([99_999, 100_000, 1 << 40, u64::MAX]) {
            assert_eq!(decimal(n), http::HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn framing_never_leaves_the_end_to_a_close_on_http_1_1() {
        let table = [
            (Version::HTTP_11, Some(5), Framing::Length(5)),
            (Version::HTTP_10, Some(5), Framing::Length(5)),
            (Version::HTTP_2, Some(0), Framing::Length(0)),
            (Version::HTTP_11, None, Framing::Chunked),
            (Version::HTTP_2, None, Framing::Frames),
            (Version::HTTP_10, None, Framing::Close),
            (Version::HTTP_09, None, Framing::Close),
        ];
        for (version, len, want) in table {
            assert_eq!(framing(version, len), want, "{version:?} {len:?}");
        }
    }
}
