//! Block-parallel gzip, with output that does not depend on the thread count.
//!
//! Owns gzip *encoding* for layers. The input is cut into fixed-size blocks and each block is
//! compressed on its own by libdeflate into a complete gzip member (header, deflate data, CRC
//! and size); the members are written in order, one after another. A gzip file of several
//! members is one gzip stream to every reader a layer meets (RFC 1952 section 2.2, `gzip -d`,
//! Go's compress/gzip and pgzip, so containerd, umoci and skopeo; zlib's gzread; bsdtar;
//! flate2's `MultiGzDecoder`): eStargz layers are built the same way.
//!
//! Why libdeflate and not one zlib stream with sync-flushed blocks primed by the 32 KiB before
//! them (what pigz does, and what this module did with zlib-rs): on the bench corpus,
//! libdeflate level 6 takes about 30% less CPU than zlib-rs level 6 and its output is 1.5%
//! smaller; level 4 (the default) gives zlib level 6's size for about 40% less CPU than zlib-rs;
//! and its lowest levels stay close in size (level 1 is 3% larger than `pigz -6`, zlib-rs's
//! level 1 23%). libdeflate compresses whole buffers only, with no preset dictionary
//! and no way to leave a stream open, hence the members; a 1 MiB block loses almost nothing
//! to starting cold.
//!
//! Every member is a pure function of (libdeflate's version, level, block size, its bytes), so
//! the output is byte-identical with 1 thread or 64. Blocks are compressed on worker threads
//! (`std::thread::scope`); a writer thread puts them back in order.
//!
//! A cut stream must not pass for a whole one, and a run of complete members would: the last
//! member's trailer (CRC and size) is held back until the next member or the end of the input
//! arrives, so when the input fails the output ends inside a member and every reader rejects it.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy)]
pub struct GzOptions {
    /// libdeflate level, in [`LEVELS`] (1-9 mean what gzip's do, roughly;
    /// 10-12 are slower and smaller still).
    pub level: u32,
    /// Worker threads (at least 1).
    pub threads: usize,
    /// Bytes of input per member. Part of the output format: the same input with another block
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

/// The level layers are written with by default. Not gzip's 6: libdeflate's levels compress
/// better than zlib's of the same number, and its level 4 gives what `gzip -6` and `pigz -6`
/// give (0.999x their size on the bench corpus) in about 0.3x pigz's CPU time; level 6 is 1.5%
/// smaller again for a third more time.
pub const DEFAULT_LEVEL: u32 = 4;
/// The levels there are.
pub const LEVELS: std::ops::RangeInclusive<u32> = MIN_LEVEL..=MAX_LEVEL;
const MIN_LEVEL: u32 = 1;
const MAX_LEVEL: u32 = 12;
/// The block size layers are written with by default: large enough that starting each member
/// with no history costs under 0.2% in size on the bench corpus, small enough to keep every
/// core busy on small layers and memory low (a few blocks per thread in flight).
pub(crate) const DEFAULT_BLOCK: usize = 1 << 20;
/// The smallest block size honoured.
const MIN_BLOCK: usize = 64 * 1024;

struct Job {
    index: u64,
    data: Vec<u8>,
    last: bool,
}

struct Done {
    index: u64,
    /// The member without its trailer in `buf[SLOT..end]`, after [`SLOT`] bytes of room for
    /// the trailer of the member before it.
    buf: Vec<u8>,
    end: usize,
    /// CRC-32 and size of the input, little-endian: the member's trailer.
    trailer: [u8; 8],
    last: bool,
}

/// Buffers to reuse: fresh memory for every block costs a page fault per page (and zeroing,
/// for the output). As many exist as blocks are in flight.
#[derive(Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn give(&self, v: Vec<u8>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(v);
    }
}

/// The gzip member header: no mtime, no name, no extra flags, OS unix (as gzip -n writes it).
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];

/// Compress everything `produce` writes into gzip on `out`. Returns `out` and what `produce`
/// returned. An error from `produce` (or the output) stops everything and the output is left
/// cut inside a member (see the module doc).
pub fn compress<W, T>(
    out: W,
    opts: &GzOptions,
    produce: impl FnOnce(&mut dyn Write) -> io::Result<T>,
) -> io::Result<(W, T)>
where
    W: Write + Send,
{
    let threads = opts.threads.max(1);
    let block = opts.block.max(MIN_BLOCK);
    let level = opts.level.clamp(MIN_LEVEL, MAX_LEVEL);
    // Input buffers go round producer -> worker -> producer, output buffers worker -> writer
    // -> worker.
    let (inputs, outputs) = (&Pool::default(), &Pool::default());
    std::thread::scope(|s| {
        // Queues of one block per thread: enough to keep every worker busy, and the memory in
        // flight is a few blocks per thread.
        let (job_tx, job_rx) = sync_channel::<Job>(threads);
        let (done_tx, done_rx) = sync_channel::<io::Result<Done>>(threads);
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            s.spawn(move || worker(level, &job_rx, &done_tx, inputs, outputs));
        }
        drop(job_rx);
        drop(done_tx);
        let writer = s.spawn(move || write_in_order(out, done_rx, outputs));

        let mut blocks = BlockWriter {
            tx: job_tx,
            spare: inputs,
            cur: Vec::with_capacity(block),
            block,
            index: 0,
        };
        let produced = produce(&mut blocks).and_then(|t| blocks.finish().map(|()| t));
        // On error `blocks` is dropped here without a last block: the writer sees the
        // channel close early and leaves the last member without its trailer.
        drop(blocks);
        let written = writer.join().expect("the gzip writer thread panicked");
        match (produced, written) {
            (Ok(t), Ok(out)) => Ok((out, t)),
            // The producer only saw the workers go away: the output's own error says why
            // (a full disk, a closed pipe).
            (Err(e), Err(w)) if is_stopped(&e) => Err(w),
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

/// What the producer sees when the workers stopped because writing the output failed; the
/// output's error replaces it in what [`compress`] returns.
#[derive(Debug, thiserror::Error)]
#[error("the gzip workers stopped (an output error)")]
struct WorkersStopped;

fn is_stopped(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<WorkersStopped>())
}

struct BlockWriter<'a> {
    tx: SyncSender<Job>,
    spare: &'a Pool,
    cur: Vec<u8>,
    block: usize,
    index: u64,
}

impl BlockWriter<'_> {
    fn send(&mut self, last: bool) -> io::Result<()> {
        let next = match self.spare.take() {
            Some(mut v) => {
                v.clear();
                v
            }
            None => Vec::with_capacity(self.block),
        };
        let data = std::mem::replace(&mut self.cur, next);
        let job = Job {
            index: self.index,
            data,
            last,
        };
        self.index += 1;
        self.tx
            .send(job)
            .map_err(|_| io::Error::other(WorkersStopped))
    }

    fn finish(&mut self) -> io::Result<()> {
        self.send(true)
    }
}

impl Write for BlockWriter<'_> {
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

fn worker(
    level: u32,
    jobs: &Mutex<Receiver<Job>>,
    done: &SyncSender<io::Result<Done>>,
    inputs: &Pool,
    outputs: &Pool,
) {
    // libdeflate keeps no state from one call to the next: one compressor per worker.
    let lvl = libdeflater::CompressionLvl::new(level as i32).expect("a level within 1..=12");
    let mut c = libdeflater::Compressor::new(lvl);
    loop {
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let buf = outputs.take().unwrap_or_default();
        let res = member(&mut c, &job.data, buf).map(|(buf, end, trailer)| Done {
            index: job.index,
            buf,
            end,
            trailer,
            last: job.last,
        });
        inputs.give(job.data);
        if done.send(res).is_err() {
            return;
        }
    }
}

/// Room before a member for the trailer of the member before it: both go out in one write.
const SLOT: usize = 8;

/// One block as a gzip member in `buf[SLOT..end]` (the header and deflate data; [`SLOT`] bytes
/// of room before it), and its trailer apart. `buf` is reused as it comes: only its length
/// matters, libdeflate overwrites what it uses.
fn member(
    c: &mut libdeflater::Compressor,
    data: &[u8],
    mut buf: Vec<u8>,
) -> io::Result<(Vec<u8>, usize, [u8; 8])> {
    let start = SLOT + HEADER.len();
    let need = start + c.deflate_compress_bound(data.len());
    if buf.len() < need {
        buf.resize(need, 0);
    }
    buf[SLOT..start].copy_from_slice(&HEADER);
    let n = c
        .deflate_compress(data, &mut buf[start..])
        .map_err(io::Error::other)?;
    let mut trailer = [0u8; 8];
    trailer[..4].copy_from_slice(&libdeflater::crc32(data).to_le_bytes());
    // ISIZE is the size modulo 2^32 (a block is far smaller).
    trailer[4..].copy_from_slice(&(data.len() as u32).to_le_bytes());
    Ok((buf, start + n, trailer))
}

/// Write the members in order; a member's trailer only once the next member (or the end) is
/// there.
fn write_in_order<W: Write>(
    mut out: W,
    done: Receiver<io::Result<Done>>,
    outputs: &Pool,
) -> io::Result<W> {
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut held: Option<[u8; 8]> = None;
    for d in done {
        let d = d?;
        pending.insert(d.index, d);
        while let Some(mut d) = pending.remove(&next) {
            let from = match held.take() {
                Some(t) => {
                    d.buf[..SLOT].copy_from_slice(&t);
                    0
                }
                None => SLOT,
            };
            out.write_all(&d.buf[from..d.end])?;
            outputs.give(std::mem::take(&mut d.buf));
            next += 1;
            if d.last {
                out.write_all(&d.trailer)?;
                out.flush()?;
                return Ok(out);
            }
            held = Some(d.trailer);
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
            MIN_BLOCK,
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
            flate2::read::MultiGzDecoder::new(&outs[0][..])
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

    /// Collects what is written, readable after the writer is gone.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A producer that fails after several blocks: the members already written must not read
    /// back as a whole (shorter) stream.
    #[test]
    fn a_failing_producer_leaves_a_stream_no_reader_accepts() {
        let opts = GzOptions {
            threads: 2,
            ..GzOptions::default()
        };
        let out = Shared::default();
        let err = compress(out.clone(), &opts, |w| {
            w.write_all(&sample(DEFAULT_BLOCK * 5 + 1000))?;
            Err::<(), _>(io::Error::other("boom"))
        })
        .err()
        .expect("an error");
        assert_eq!(err.to_string(), "boom");
        let bytes = out.0.lock().unwrap().clone();
        assert!(bytes.len() > 1000, "some members were written");
        let mut back = Vec::new();
        let r = flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_end(&mut back);
        assert!(r.is_err(), "flate2 read a cut stream as whole");
        let gzip = crate::userns::which("gzip");
        if ovl_tests::require("gzip", gzip.is_some()) {
            let t = tempfile::tempdir().unwrap();
            let p = t.path().join("x.gz");
            std::fs::write(&p, &bytes).unwrap();
            let st = std::process::Command::new(gzip.expect("checked"))
                .arg("-t")
                .arg(&p)
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(!st.success(), "gzip -t passed a cut stream");
        }
    }

    /// Every member is a gzip member with the reproducible header, and the data splits into
    /// members of exactly the block size.
    #[test]
    fn members_of_one_block_each() {
        let block = MIN_BLOCK;
        let data = sample(block * 3 + 10);
        let opts = GzOptions {
            threads: 2,
            block,
            ..GzOptions::default()
        };
        let out = compress_bytes(&data, &opts).unwrap();
        let mut rest = &out[..];
        let mut sizes = Vec::new();
        while !rest.is_empty() {
            assert_eq!(rest[..10], HEADER);
            let mut d = flate2::bufread::GzDecoder::new(rest);
            let mut back = Vec::new();
            d.read_to_end(&mut back).unwrap();
            sizes.push(back.len());
            let left = d.into_inner();
            rest = left;
        }
        assert_eq!(sizes, [block, block, block, 10]);
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
        // Many more blocks than the queues hold, so the producer meets the stopped workers.
        let data = sample(64 << 20);
        let r = compress(Full(1000), &opts, |w| w.write_all(&data));
        // The output's own error, not the producer's "the workers stopped".
        let e = r.err().expect("a failing output is an error");
        assert_eq!(e.to_string(), "disk full");
    }
}
