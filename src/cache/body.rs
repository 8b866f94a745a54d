//! A body streamed out of the store, as the handlers write it to a client: chunks, then
//! either the end or an error. An error must reach the client as a cut response, never as a
//! short body that looks whole, so a body's end means its bytes were verified.
//!
//! The stream knows nothing of the session it is written to: [`super::verified`] and
//! [`super::fill`] make bodies, the handlers write them (`respond::stream_body`).

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::fill::FillError;

/// The chunks of a body; an `Err` is its last item.
pub type Body = BoxStream<'static, Result<Bytes, BodyError>>;

/// Why a body stopped before its end.
#[derive(Debug)]
pub enum BodyError {
    /// A blob's bytes did not hash to its address, or fell short of its length. The blob
    /// (and the record naming it) is already deleted, so the next request refills it.
    Corrupt,
    /// Reading a blob from disk failed.
    Read(std::io::Error),
    /// The fill the body was read from failed.
    Fill(FillError),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Corrupt => f.write_str("blob failed verification"),
            BodyError::Read(e) => write!(f, "blob read failed: {e}"),
            BodyError::Fill(e) => write!(f, "fill failed: {e:?}"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Read(e) => Some(e),
            _ => None,
        }
    }
}

/// `body` with its last chunk held back until the body has ended well. Where the end is
/// what verifies the bytes (a blob's hash, a package's signed checksum), a client whose
/// framing cannot show a cut (a `Content-Length` that the bytes so far would satisfy) then
/// never gets the whole of a body that fails: on an error the held chunk is dropped.
pub fn hold_last(body: Body) -> Body {
    futures::stream::unfold(Some((body, None)), |state| async move {
        let (mut body, mut held): (Body, Option<Bytes>) = state?;
        loop {
            match body.next().await {
                Some(Ok(chunk)) => {
                    if let Some(out) = held.replace(chunk) {
                        return Some((Ok(out), Some((body, held))));
                    }
                }
                // The held chunk is never released: the body ends with the error.
                Some(Err(e)) => return Some((Err(e), None)),
                None => return held.map(|last| (Ok(last), None)),
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(items: Vec<Result<&'static str, BodyError>>) -> Body {
        futures::stream::iter(
            items
                .into_iter()
                .map(|i| i.map(|s| Bytes::from_static(s.as_bytes()))),
        )
        .boxed()
    }

    async fn collect(body: Body) -> Vec<Result<Bytes, String>> {
        body.map(|i| i.map_err(|e| e.to_string())).collect().await
    }

    #[tokio::test]
    async fn the_last_chunk_waits_for_a_good_end() {
        let whole = collect(hold_last(body(vec![Ok("a"), Ok("b"), Ok("c")]))).await;
        let want: Vec<Result<Bytes, String>> = ["a", "b", "c"]
            .into_iter()
            .map(|s| Ok(Bytes::from_static(s.as_bytes())))
            .collect();
        assert_eq!(whole, want);

        let failed = collect(hold_last(body(vec![
            Ok("a"),
            Ok("b"),
            Err(BodyError::Corrupt),
            Ok("never"),
        ])))
        .await;
        assert_eq!(
            failed,
            vec![
                Ok(Bytes::from_static(b"a")),
                Err("blob failed verification".to_string())
            ],
            "the chunk before the error is held back, and nothing follows it"
        );

        assert!(collect(hold_last(body(vec![]))).await.is_empty());
    }
}
