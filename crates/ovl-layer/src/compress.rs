//! Compression: sniffing the format from magic bytes, and decoding in-process.
//!
//! Owns which compressions a layer may come in. Decompression always happens in this process
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
}

impl Compression {
    /// Judge by the first bytes of the stream.
    pub(crate) fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
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
    };
    Ok((kind, out))
}

const CHUNK: usize = 256 * 1024;
const DEPTH: usize = 16;

/// A reader whose source is read on another thread, [`CHUNK`]-sized pieces at a time, at most
/// [`DEPTH`] pieces ahead: constant memory, and decompression overlaps with the consumer.
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
