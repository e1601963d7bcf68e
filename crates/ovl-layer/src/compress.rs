//! Compression: sniffing the format from magic bytes, and decoding in-process.
//!
//! Owns which compressions a layer may come in (gzip, zstd, xz, bzip2; others are named in the
//! error). Decompression always happens in this process
//! (never by running a helper binary that an image could shadow), on its own thread, so the
//! thread that writes files never waits on inflate ([`ThreadedReader`]).

use std::io::{self, BufRead, BufReader, Read};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// A layer stream's compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    /// System images ship `rootfs.tar.xz`.
    Xz,
    Bzip2,
    /// A format we recognise but do not read (`.Z`, lz4, lzma, ...): its name, for the error.
    Unsupported(&'static str),
}

/// Magic numbers of the formats a tarball may come in that we do not read, so the error can
/// name them.
const UNSUPPORTED: &[(&[u8], &str)] = &[
    (&[0x1f, 0x9d], "compress (.Z)"),
    (&[0x1f, 0xa0], "LZH compress"),
    (&[0x04, 0x22, 0x4d, 0x18], "lz4"),
    (&[0x02, 0x21, 0x4c, 0x18], "lz4 (legacy)"),
    (b"LZIP", "lzip"),
    (&[0x5d, 0x00, 0x00], "lzma"),
    (&[0x37, 0x7a, 0xbc, 0xaf, 0x27, 0x1c], "7z"),
    (b"PK\x03\x04", "zip"),
];

impl Compression {
    /// Judge by the first bytes of the stream.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
            // A zstd stream may open with a skippable frame (magic 0x184D2A50..5F); the
            // decoder steps over it.
            || (head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18])
        {
            Compression::Zstd
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if head.len() >= 4 && head.starts_with(b"BZh") && (b'1'..=b'9').contains(&head[3]) {
            Compression::Bzip2
        } else if looks_like_tar(head) {
            Compression::None
        } else if let Some((_, name)) = UNSUPPORTED.iter().find(|(m, _)| head.starts_with(m)) {
            Compression::Unsupported(name)
        } else {
            Compression::None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Bzip2 => "bzip2",
            Compression::Unsupported(name) => name,
        }
    }
}

/// A first block that is a tar header with a good checksum: plain tar, whatever its first
/// bytes (a member named `]` starts like an lzma stream).
fn looks_like_tar(head: &[u8]) -> bool {
    let Some(block) = head.get(..512) else {
        return false;
    };
    let stored = std::str::from_utf8(&block[148..156])
        .ok()
        .map(|s| s.trim_matches(|c| c == ' ' || c == '\0'))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    stored == Some(sum)
}

/// Peek at a stream's first bytes, then wrap it in the right decoder.
pub fn decoder<R: Read + Send + 'static>(
    reader: R,
) -> io::Result<(Compression, Box<dyn Read + Send>)> {
    let mut buf = BufReader::with_capacity(256 * 1024, reader);
    let head = buf.fill_buf()?;
    if head.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the input is empty",
        ));
    }
    let kind = Compression::sniff(head);
    let out: Box<dyn Read + Send> = match kind {
        Compression::None => Box::new(buf),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buf)),
        Compression::Zstd => Box::new(zstd::Decoder::with_buffer(buf)?),
        Compression::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(buf)),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(buf)),
        Compression::Unsupported(name) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the input is {name}-compressed, which is not supported: decompress it \
                     first (gzip, zstd, xz, bzip2 and plain tar are read)"
                ),
            ));
        }
    };
    Ok((kind, out))
}

const CHUNK: usize = 256 * 1024;
const DEPTH: usize = 16;

/// A reader whose source is read on another thread, `CHUNK`-sized pieces at a time, at most
/// `DEPTH` pieces ahead: constant memory, and decompression overlaps with the consumer.
pub struct ThreadedReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
    recycle: SyncSender<Vec<u8>>,
}

impl ThreadedReader {
    pub fn new<R: Read + Send + 'static>(mut inner: R) -> ThreadedReader {
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(DEPTH);
        let (recycle, spare) = sync_channel::<Vec<u8>>(DEPTH + 2);
        std::thread::Builder::new()
            .name("ovl-read".into())
            .spawn(move || {
                loop {
                    let mut buf = spare
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
                    buf.resize(CHUNK, 0);
                    let mut filled = 0;
                    let res = loop {
                        match inner.read(&mut buf[filled..]) {
                            Ok(0) => break Ok(()),
                            Ok(n) => {
                                filled += n;
                                if filled == CHUNK {
                                    break Ok(());
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => break Err(e),
                        }
                    };
                    buf.truncate(filled);
                    let eof = filled < CHUNK;
                    if filled > 0 && tx.send(Ok(buf)).is_err() {
                        return;
                    }
                    if let Err(e) = res {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    if eof {
                        return;
                    }
                }
            })
            .expect("spawn the reader thread");
        ThreadedReader {
            rx,
            cur: Vec::new(),
            pos: 0,
            done: false,
            recycle,
        }
    }
}

impl Read for ThreadedReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    let old = std::mem::replace(&mut self.cur, buf);
                    let _ = self.recycle.try_send(old);
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sniffs_and_decodes_gzip_zstd_plain() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&data[..], 1).unwrap();
        for (input, kind) in [
            (gz, Compression::Gzip),
            (zs, Compression::Zstd),
            (data.clone(), Compression::None),
        ] {
            let (k, r) = decoder(io::Cursor::new(input)).unwrap();
            assert_eq!(k, kind);
            let mut out = Vec::new();
            ThreadedReader::new(r).read_to_end(&mut out).unwrap();
            assert!(out == data, "{kind:?} round trip");
        }
        assert!(decoder(io::Cursor::new(Vec::new())).is_err());
    }

    #[test]
    fn threaded_reader_passes_errors_on() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("boom"));
                }
                self.0 -= 1;
                b[0] = 1;
                Ok(1)
            }
        }
        let mut out = Vec::new();
        let err = ThreadedReader::new(Failing(10))
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert_eq!(out.len(), 10);
    }
}
