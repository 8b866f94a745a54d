//! Is a tarball body whole? Checked while it streams, before a fill commits.
//!
//! HTTP framing says whether the upstream *meant* the body to end there; the bytes themselves
//! can say more when they are a gzipped tar, as module packages are:
//! - gzip: every member's trailer must be present and match (CRC-32 and length of the
//!   decompressed data), so a body cut anywhere in a gzip stream is caught;
//! - tar (recognised by `ustar` in the first header): the decompressed data must be whole
//!   512-byte blocks ending with the two zero blocks of the end-of-archive marker.
//!
//! A body that is not gzip is not checked (GitLab stores whatever file was uploaded). The
//! verdict is a value; the fill decides what to do with it.

use std::io::{self, Write};

use flate2::write::MultiGzDecoder;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const BLOCK: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A complete gzip stream holding a complete tar archive.
    Whole,
    /// A complete gzip stream whose content is not a tar archive.
    GzipOnly,
    /// Not gzip: nothing could be checked.
    Unchecked,
    /// The gzip stream is cut short, corrupt, or followed by garbage.
    BadGzip,
    /// A tar archive without its end-of-archive marker (cut at a member boundary).
    NoEndOfArchive,
}

impl Verdict {
    /// May a body with this verdict be kept?
    pub fn keep(self) -> bool {
        matches!(
            self,
            Verdict::Whole | Verdict::GzipOnly | Verdict::Unchecked
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Whole => "whole",
            Verdict::GzipOnly => "gzip_only",
            Verdict::Unchecked => "unchecked",
            Verdict::BadGzip => "bad_gzip",
            Verdict::NoEndOfArchive => "no_end_of_archive",
        }
    }
}

/// What the tar check needs of the decompressed bytes, without keeping them.
#[derive(Default)]
struct TarTail {
    total: u64,
    /// The first block, until it is complete.
    first: Vec<u8>,
    /// Consecutive zero bytes at the end so far.
    trailing_zeros: u64,
}

impl Write for TarTail {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.first.len() < BLOCK as usize {
            let take = (BLOCK as usize - self.first.len()).min(buf.len());
            self.first.extend_from_slice(&buf[..take]);
        }
        match buf.iter().rposition(|&b| b != 0) {
            Some(last) => self.trailing_zeros = (buf.len() - 1 - last) as u64,
            None => self.trailing_zeros += buf.len() as u64,
        }
        self.total += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TarTail {
    fn is_tar(&self) -> bool {
        // POSIX ustar and GNU tar both write "ustar" at offset 257 of every header.
        self.first.get(257..262) == Some(b"ustar".as_slice())
    }

    fn ends_whole(&self) -> bool {
        self.total % BLOCK == 0 && self.trailing_zeros >= 2 * BLOCK
    }
}

enum State {
    /// Fewer than two bytes seen.
    Start(Vec<u8>),
    Gzip(Box<MultiGzDecoder<TarTail>>),
    NotGzip,
    Broken,
}

/// Feed it every chunk of a body, then ask for the verdict.
pub struct Checker {
    state: State,
}

impl Default for Checker {
    fn default() -> Self {
        Checker {
            state: State::Start(Vec::new()),
        }
    }
}

impl Checker {
    pub fn feed(&mut self, chunk: &[u8]) {
        if let State::Start(seen) = &mut self.state {
            seen.extend_from_slice(chunk);
            if seen.len() < 2 {
                return;
            }
            let seen = std::mem::take(seen);
            if seen[..2] != GZIP_MAGIC {
                self.state = State::NotGzip;
                return;
            }
            self.state = State::Gzip(Box::new(MultiGzDecoder::new(TarTail::default())));
            return self.push(&seen);
        }
        self.push(chunk);
    }

    fn push(&mut self, chunk: &[u8]) {
        if let State::Gzip(d) = &mut self.state {
            if d.write_all(chunk).is_err() {
                self.state = State::Broken;
            }
        }
    }

    pub fn verdict(self) -> Verdict {
        match self.state {
            State::Start(_) | State::NotGzip => Verdict::Unchecked,
            State::Broken => Verdict::BadGzip,
            State::Gzip(mut d) => {
                if d.try_finish().is_err() {
                    return Verdict::BadGzip;
                }
                let tail = d.get_ref();
                match (tail.is_tar(), tail.ends_whole()) {
                    (false, _) => Verdict::GzipOnly,
                    (true, true) => Verdict::Whole,
                    (true, false) => Verdict::NoEndOfArchive,
                }
            }
        }
    }
}

/// The verdict on a whole body.
#[cfg(test)]
pub fn check(body: &[u8]) -> Verdict {
    let mut c = Checker::default();
    c.feed(body);
    c.verdict()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    /// A tar with one member of `size` pseudo-random bytes, end-of-archive included.
    fn tar(size: usize) -> Vec<u8> {
        let mut header = [0u8; 512];
        header[..7].copy_from_slice(b"main.tf");
        header[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        header[257..263].copy_from_slice(b"ustar\0");
        let mut out = header.to_vec();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        out.extend((0..size).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8 | 1
        }));
        out.resize(out.len().div_ceil(512) * 512, 0);
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn fed_in_pieces(body: &[u8], piece: usize) -> Verdict {
        let mut c = Checker::default();
        for p in body.chunks(piece) {
            c.feed(p);
        }
        c.verdict()
    }

    #[test]
    fn verdicts() {
        let whole = gzip(&tar(3000));
        let tar_without_end = {
            let t = tar(3000);
            gzip(&t[..t.len() - 1024])
        };
        let two_members = [gzip(&tar(100)[..512]), gzip(&tar(100)[512..])].concat();
        let table: Vec<(&str, Vec<u8>, Verdict)> = vec![
            ("whole .tgz", whole.clone(), Verdict::Whole),
            (
                "cut mid-stream",
                whole[..whole.len() / 2].to_vec(),
                Verdict::BadGzip,
            ),
            (
                "cut in the trailer",
                whole[..whole.len() - 3].to_vec(),
                Verdict::BadGzip,
            ),
            (
                "garbage after",
                [whole.clone(), b"junk".to_vec()].concat(),
                Verdict::BadGzip,
            ),
            (
                "flipped CRC",
                {
                    let mut w = whole.clone();
                    let n = w.len();
                    w[n - 8] ^= 1;
                    w
                },
                Verdict::BadGzip,
            ),
            (
                "tar without end-of-archive",
                tar_without_end,
                Verdict::NoEndOfArchive,
            ),
            ("gzip of text", gzip(b"hello"), Verdict::GzipOnly),
            ("multi-member gzip", two_members, Verdict::Whole),
            ("not gzip", b"plain bytes".to_vec(), Verdict::Unchecked),
            ("one byte", vec![0x1f], Verdict::Unchecked),
            ("empty", vec![], Verdict::Unchecked),
        ];
        for (name, body, want) in table {
            assert_eq!(check(&body), want, "{name}");
            assert_eq!(fed_in_pieces(&body, 1), want, "{name}, byte by byte");
            assert_eq!(fed_in_pieces(&body, 700), want, "{name}, in pieces");
        }
    }

    #[test]
    fn only_some_verdicts_may_be_kept() {
        assert!(Verdict::Whole.keep() && Verdict::GzipOnly.keep() && Verdict::Unchecked.keep());
        assert!(!Verdict::BadGzip.keep() && !Verdict::NoEndOfArchive.keep());
    }
}
