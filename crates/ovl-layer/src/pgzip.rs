//! Block-parallel gzip (what pigz does), with output that does not depend on the thread count.
//!
//! Owns gzip *encoding* for layers. The input is cut into fixed-size blocks; each block is
//! compressed on its own as raw deflate, primed with the 32 KiB of input before it as the
//! dictionary (so matches reach back across the cut, as one deflate stream would), and ends
//! with a sync flush, which leaves it byte-aligned so the blocks simply concatenate; the last
//! block ends the deflate stream instead. One gzip header (mtime 0, no name: reproducible) and
//! one trailer: the CRCs of the blocks are combined, never recomputed serially.
//!
//! Every block is a pure function of (level, block size, its bytes, the 32 KiB before it), so
//! the output is byte-identical with 1 thread or 64. The blocks are compressed on worker
//! threads (`std::thread::scope`); a writer thread puts them back in order.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use flate2::{Compress, Compression, FlushCompress, Status};

/// The deflate window: how far back a match can reach.
const WINDOW: usize = 32 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct GzOptions {
    /// zlib level 1-9.
    pub level: u32,
    /// Worker threads (at least 1).
    pub threads: usize,
    /// Bytes of input per block. Part of the output format: the same input with another block
    /// size gives other (equally valid) bytes.
    pub block: usize,
}

impl Default for GzOptions {
    fn default() -> Self {
        GzOptions {
            level: DEFAULT_LEVEL,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            block: DEFAULT_BLOCK,
        }
    }
}

/// The level layers are written with by default.
pub(crate) const DEFAULT_LEVEL: u32 = 6;
/// The block size layers are written with by default.
pub(crate) const DEFAULT_BLOCK: usize = 256 * 1024;

struct Job {
    index: u64,
    dict: Vec<u8>,
    data: Vec<u8>,
    last: bool,
}

struct Done {
    index: u64,
    deflated: Vec<u8>,
    crc: crc32fast::Hasher,
    /// Input bytes in the block (for the trailer's ISIZE).
    len: u64,
    last: bool,
}

/// The gzip member header: no mtime, no name, OS unix.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];

/// Compress everything `produce` writes into one gzip member on `out`. Returns `out` and what
/// `produce` returned. An error from `produce` (or the output) stops everything and no trailer
/// is written, so a cut stream never passes for a whole one.
pub fn compress<W, T>(
    out: W,
    opts: &GzOptions,
    produce: impl FnOnce(&mut dyn Write) -> io::Result<T>,
) -> io::Result<(W, T)>
where
    W: Write + Send,
{
    let threads = opts.threads.max(1);
    let block = opts.block.max(WINDOW);
    let level = opts.level.clamp(1, 9);
    std::thread::scope(|s| {
        let (job_tx, job_rx) = sync_channel::<Job>(threads * 2);
        let (done_tx, done_rx) = sync_channel::<io::Result<Done>>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            s.spawn(move || worker(level, &job_rx, &done_tx));
        }
        drop(job_rx);
        drop(done_tx);
        let writer = s.spawn(move || write_in_order(out, done_rx));

        let mut blocks = BlockWriter {
            tx: job_tx,
            cur: Vec::with_capacity(block),
            block,
            prev_tail: Vec::new(),
            index: 0,
        };
        let produced = produce(&mut blocks).and_then(|t| blocks.finish().map(|()| t));
        // On error `blocks` is dropped here without a last block: the writer sees the
        // channel close early and writes no trailer.
        drop(blocks);
        let written = writer.join().expect("the gzip writer thread panicked");
        match (produced, written) {
            (Ok(t), Ok(out)) => Ok((out, t)),
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(e),
        }
    })
}

/// Compress `data` into a `Vec` (for the tests).
#[cfg(test)]
fn compress_bytes(data: &[u8], opts: &GzOptions) -> io::Result<Vec<u8>> {
    compress(Vec::new(), opts, |w| w.write_all(data)).map(|(v, ())| v)
}

struct BlockWriter {
    tx: SyncSender<Job>,
    cur: Vec<u8>,
    block: usize,
    /// The last [`WINDOW`] bytes before `cur`.
    prev_tail: Vec<u8>,
    index: u64,
}

impl BlockWriter {
    fn send(&mut self, last: bool) -> io::Result<()> {
        let data = std::mem::replace(&mut self.cur, Vec::with_capacity(self.block));
        let tail_from = data.len().saturating_sub(WINDOW);
        let next_tail = data[tail_from..].to_vec();
        let dict = std::mem::replace(&mut self.prev_tail, next_tail);
        let job = Job {
            index: self.index,
            dict,
            data,
            last,
        };
        self.index += 1;
        self.tx
            .send(job)
            .map_err(|_| io::Error::other("the gzip workers stopped (an output error)"))
    }

    fn finish(&mut self) -> io::Result<()> {
        self.send(true)
    }
}

impl Write for BlockWriter {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        while !buf.is_empty() {
            let room = self.block - self.cur.len();
            let k = room.min(buf.len());
            self.cur.extend_from_slice(&buf[..k]);
            buf = &buf[k..];
            if self.cur.len() == self.block {
                self.send(false)?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn worker(level: u32, jobs: &Mutex<Receiver<Job>>, done: &SyncSender<io::Result<Done>>) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        // A fresh compressor per block: a reset one may keep state from the blocks this worker
        // did before (seen with zlib-rs), and then the bytes would depend on which worker
        // got which block.
        let mut c = Compress::new(Compression::new(level), false);
        let res = deflate_block(&mut c, &job).map(|deflated| {
            let mut crc = crc32fast::Hasher::new();
            crc.update(&job.data);
            Done {
                index: job.index,
                deflated,
                crc,
                len: job.data.len() as u64,
                last: job.last,
            }
        });
        if done.send(res).is_err() {
            return;
        }
    }
}

/// One block as raw deflate: primed with the dictionary, ended by a sync flush (or, for the
/// last block, by the end of the stream).
fn deflate_block(c: &mut Compress, job: &Job) -> io::Result<Vec<u8>> {
    if !job.dict.is_empty() {
        c.set_dictionary(&job.dict).map_err(io::Error::other)?;
    }
    let flush = if job.last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out = Vec::with_capacity(job.data.len() / 2 + 1024);
    let start_in = c.total_in();
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity().max(64 * 1024));
        }
        let consumed = (c.total_in() - start_in) as usize;
        let spare_before = out.capacity() - out.len();
        let status = c
            .compress_vec(&job.data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let used = spare_before - (out.capacity() - out.len());
        let all_in = (c.total_in() - start_in) as usize == job.data.len();
        match status {
            Status::StreamEnd => break,
            // A sync flush is complete once all input is in and the output had room to spare.
            Status::Ok | Status::BufError if !job.last && all_in && used < spare_before => break,
            Status::Ok | Status::BufError => {}
        }
    }
    Ok(out)
}

/// Write the header, the blocks in order, and (after the last block) the trailer.
fn write_in_order<W: Write>(mut out: W, done: Receiver<io::Result<Done>>) -> io::Result<W> {
    out.write_all(&HEADER)?;
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut crc = crc32fast::Hasher::new();
    let mut total: u64 = 0;
    for d in done {
        let d = d?;
        pending.insert(d.index, d);
        while let Some(d) = pending.remove(&next) {
            out.write_all(&d.deflated)?;
            crc.combine(&d.crc);
            total += d.len;
            next += 1;
            if d.last {
                out.write_all(&crc.clone().finalize().to_le_bytes())?;
                out.write_all(&(total as u32).to_le_bytes())?;
                out.flush()?;
                return Ok(out);
            }
        }
    }
    Err(io::Error::other(
        "the gzip stream was cut short (its input failed)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(n: usize) -> Vec<u8> {
        // Compressible but not trivial: words from a small pseudo-random generator.
        let words: [&[u8]; 8] = [
            b"overlay ",
            b"layer ",
            b"whiteout ",
            b"opaque ",
            b"\x00\x01\x02",
            b"tar ",
            b"gzip\n",
            b"zstd ",
        ];
        let mut x = 0x1234_5678u32;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            out.extend_from_slice(words[(x % 8) as usize]);
            if x % 7 == 0 {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out.truncate(n);
        out
    }

    #[test]
    fn same_bytes_with_any_thread_count_and_decodable() {
        for n in [
            0,
            1,
            100,
            WINDOW,
            DEFAULT_BLOCK,
            DEFAULT_BLOCK * 3,
            2_500_000,
        ] {
            let data = sample(n);
            let mut outs = Vec::new();
            for threads in [1, 2, 4] {
                let opts = GzOptions {
                    threads,
                    ..GzOptions::default()
                };
                outs.push(compress_bytes(&data, &opts).unwrap());
            }
            assert!(outs[0] == outs[1] && outs[1] == outs[2], "size {n}");
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&outs[0][..])
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == data, "flate2 round trip of {n} bytes");
            if n > 100_000 {
                assert!(outs[0].len() < n / 2, "{n} -> {}", outs[0].len());
            }
            let gzip = crate::userns::which("gzip");
            if ovl_tests::require("gzip", gzip.is_some()) {
                let gzip = gzip.expect("checked");
                let t = tempfile::tempdir().unwrap();
                let p = t.path().join("x.gz");
                std::fs::write(&p, &outs[0]).unwrap();
                let out = std::process::Command::new(gzip)
                    .args(["-dc"])
                    .arg(&p)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "gzip -d: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(out.stdout == data, "gzip -d round trip of {n} bytes");
            }
        }
    }

    /// Real data (this test's own executable): a compressor that keeps state between blocks
    /// would make the bytes depend on which worker got which block.
    #[test]
    fn real_data_same_bytes_with_1_2_3_threads() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let data = &exe[..exe.len().min(8 << 20)];
        let outs: Vec<Vec<u8>> = [1, 2, 3]
            .iter()
            .map(|&threads| {
                let opts = GzOptions {
                    threads,
                    ..GzOptions::default()
                };
                compress_bytes(data, &opts).unwrap()
            })
            .collect();
        assert!(outs[0] == outs[1], "1 vs 2 threads");
        assert!(outs[0] == outs[2], "1 vs 3 threads");
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&outs[0][..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
    }

    #[test]
    fn a_failing_producer_writes_no_trailer() {
        let opts = GzOptions::default();
        let err = compress(Vec::new(), &opts, |w| {
            w.write_all(&sample(1_000_000))?;
            Err::<(), _>(io::Error::other("boom"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "boom");
    }

    #[test]
    fn a_failing_output_is_an_error() {
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 < b.len() {
                    return Err(io::Error::other("disk full"));
                }
                self.0 -= b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let opts = GzOptions::default();
        let data = sample(5_000_000);
        let r = compress(Full(1000), &opts, |w| w.write_all(&data));
        assert!(r.is_err());
    }
}
