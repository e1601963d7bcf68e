//! Writing the content of a layer's files on more than one thread.
//!
//! Owns the writer pool of [`crate::extract`]. The extractor's thread reads the archive in
//! order and makes every change to the namespace itself (mkdir, create, symlink, link, mknod,
//! unlink, whiteouts, opaque markers), so names appear exactly in archive order: a hardlink
//! finds its target, a replaced path is replaced in order. What it hands over is an open,
//! freshly created file: the writers put its data in (holes stay holes) and then give it its
//! metadata through the fd, in [`crate::apply`]'s order. A writer holding the fd of a file that
//! a later entry replaced or whited out writes into an inode nothing names, which is harmless
//! (a hardlink made to it in between still names it, as it should).
//!
//! A file goes over in pieces of at most [`PIECE`] bytes, each written at its offset by
//! whichever writer takes it; the writer that writes its last piece gives it its size (sparse)
//! and metadata. Memory and fds are bounded: at most [`MAX_QUEUED`] bytes of data and
//! [`MAX_OPEN`] files are in flight; the reader waits for room.
//!
//! When the archive is a plain tar file ([`DirectFile`]), a file of [`DIRECT_MIN`] bytes or
//! more is not read at all: one piece names its range of the archive, which one writer copies
//! with `copy_file_range` (one copy, where reading and writing would make two, and the
//! extractor's thread never touches the data). One writer, because writes to a file hold its
//! inode lock: two copying parts of the same file would take turns, spinning.
//!
//! Idle writers are woken per batch of pieces, not per piece (see [`WAKE_PIECES`]).
//!
//! With one writer there are no threads: each piece is written as it is read, by the same
//! functions, so one writer and many give the same tree.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::apply::{self, Meta, Perms, Target};
use crate::copy::{copy_range, write_at};
use crate::extract::{ExtractError, MetaPolicy, apply_err, data_err, entry_err};

/// The most data one piece carries (and the reader reads in one go).
pub(crate) const PIECE: usize = 1 << 20;
/// The most bytes of data read but not yet written: about what a layer's writers hold at most
/// (a buffer is only made when none is free for reuse), so one extraction's peak stays under
/// 64 MiB; `ovl-import oci: --jobs N` runs up to N extractions, each with its own bound.
pub(crate) const MAX_QUEUED: usize = 32 << 20;
/// The most files created but not yet finished (each holds an fd).
pub(crate) const MAX_OPEN: usize = 256;
/// Pieces of at least this size are read into buffers of [`PIECE`] bytes that go back and
/// forth between the reader and the writers: fresh big buffers cost page faults, and the
/// unmapping of freed ones stalls every thread of the process.
const POOLED: usize = 64 << 10;
/// The most buffers kept for reuse.
const MAX_SPARE: usize = MAX_QUEUED / PIECE;
/// An idle writer is woken once this many pieces wait, or [`WAKE_BYTES`] of data: a wake per
/// small file cost the reader, whose thread is the import's critical path, a tenth of its
/// time in futex calls. The reader wakes them all before it waits itself, and at the end.
const WAKE_PIECES: usize = 16;
const WAKE_BYTES: usize = 1 << 20;
/// A file copied from the archive is copied this much at a time, the writer checking between
/// two steps that the extraction has not failed (a failed import does not wait for the rest).
const COPY_STEP: u64 = 8 << 20;

/// A created file on its way to the writers.
struct OpenFile {
    file: File,
    meta: Meta,
    /// The entry's name, for errors.
    raw: Vec<u8>,
    /// Its place in the archive: of several errors, the earliest entry's is reported.
    seq: u64,
    /// Pieces not yet written.
    pending: AtomicUsize,
    /// A sparse file's full size, given once its data is in.
    size: Option<u64>,
}

struct Piece {
    file: Arc<OpenFile>,
    /// Where in the file the data goes.
    at: u64,
    data: Vec<u8>,
    /// Or: the data is this many bytes of this file at this offset (see [`DirectFile`]).
    from: Option<(Arc<File>, u64, u64)>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Piece>,
    /// Bytes of data in the queue and being written.
    bytes: usize,
    /// Files handed over and not finished.
    open: usize,
    /// No more pieces are coming.
    closed: bool,
    /// [`PIECE`]-capacity buffers back from the writers, for the reader to fill again.
    spare: Vec<Vec<u8>>,
    /// The earliest entry's error (by archive order), and its place.
    error: Option<(u64, ExtractError)>,
    skipped_xattrs: u64,
    /// Writers waiting for a piece; the reader waiting for room.
    idle_writers: usize,
    reader_waits: bool,
}

struct Shared {
    state: Mutex<State>,
    /// A piece is queued, or the queue is closed.
    work: Condvar,
    /// Room was made in the queue.
    room: Condvar,
    failed: AtomicBool,
    policy: MetaPolicy,
}

/// The writers of one extraction.
pub(crate) struct Writers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// With no threads: the buffer pieces are read into and written from.
    buf: Vec<u8>,
}

/// Raise the soft limit on open files to the hard one, once per process (as Go's runtime does
/// at start). Each pool holds up to [`MAX_OPEN`] files open and `ovl-import oci: --jobs N`
/// runs N pools at once, so the usual soft limit of 1024 is reached from 4 jobs on, and the
/// import would fail with EMFILE where `--jobs 1` succeeds. Failing to raise it is not an
/// error: the pool then meets EMFILE only if the limit really is that low.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut limit = getrlimit(Resource::Nofile);
        if limit.current < limit.maximum {
            limit.current = limit.maximum;
            let _ = setrlimit(Resource::Nofile, limit);
        }
    });
}

impl Writers {
    /// `n` writers (1: the calling thread writes, no threads are started).
    pub(crate) fn new(n: usize, policy: MetaPolicy) -> io::Result<Writers> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            room: Condvar::new(),
            failed: AtomicBool::new(false),
            policy,
        });
        let mut w = Writers {
            shared,
            threads: Vec::new(),
            buf: Vec::new(),
        };
        if n > 1 {
            raise_open_file_limit();
            for i in 0..n {
                let shared = w.shared.clone();
                let t = std::thread::Builder::new()
                    .name(format!("ovl-write-{i}"))
                    .spawn(move || writer(&shared))?;
                w.threads.push(t);
            }
        }
        Ok(w)
    }

    /// True once a writer failed: the reader stops, and [`Self::finish`] says why.
    pub(crate) fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Write the data of the regular file `fd` (just created, empty) as the archive gives it:
    /// `chunks` are (offset, length) runs of the file that the packed data in `data` fills in
    /// turn, `size` a sparse file's full size. Then its metadata, with the permission bits it
    /// was created with. Returns the bytes of data read (all of them, or an error).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn file(
        &mut self,
        fd: OwnedFd,
        data: &mut impl Read,
        chunks: &[(u64, u64)],
        size: Option<u64>,
        meta: Meta,
        raw: &[u8],
        seq: u64,
    ) -> Result<u64, ExtractError> {
        let pieces: usize = chunks
            .iter()
            .map(|&(_, len)| len.div_ceil(PIECE as u64) as usize)
            .sum::<usize>()
            .max(1);
        let file = OpenFile {
            file: File::from(fd),
            meta,
            raw: raw.to_vec(),
            seq,
            pending: AtomicUsize::new(pieces),
            size,
        };
        if self.threads.is_empty() {
            return self.file_inline(&file, data, chunks);
        }
        self.reserve_open();
        let file = Arc::new(file);
        // The last piece takes this reference: the writer that finishes the file closes it.
        let mut owner = Some(file);
        let mut next = |sent: usize| -> Arc<OpenFile> {
            if sent + 1 == pieces {
                owner.take().expect("one last piece")
            } else {
                owner.clone().expect("not past the last piece")
            }
        };
        let mut total = 0u64;
        let mut sent = 0usize;
        for &(off, len) in chunks {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(PIECE as u64) as usize;
                let mut buf = self.take_buf(n);
                // On an error the file never finishes; the extraction fails as a whole.
                data.read_exact(&mut buf).map_err(|e| data_err(raw, e))?;
                let file = next(sent);
                self.send(Piece {
                    file,
                    at: off + done,
                    data: buf,
                    from: None,
                });
                sent += 1;
                done += n as u64;
            }
            total += len;
        }
        if sent == 0 {
            let file = next(sent);
            self.send(Piece {
                file,
                at: 0,
                data: Vec::new(),
                from: None,
            });
        }
        Ok(total)
    }

    /// As [`Self::file`], for a file whose `len` bytes of data are at `off` in `src`: copied
    /// from there, never read into memory, by one writer (writes to one file take its inode
    /// lock in the kernel: writers copying pieces of the same file only spin on each other).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy(
        &mut self,
        fd: OwnedFd,
        (src, off): (Arc<File>, u64),
        len: u64,
        meta: Meta,
        raw: &[u8],
        seq: u64,
    ) -> Result<u64, ExtractError> {
        let file = OpenFile {
            file: File::from(fd),
            meta,
            raw: raw.to_vec(),
            seq,
            pending: AtomicUsize::new(1),
            size: None,
        };
        if self.threads.is_empty() {
            copy_range(&src, off, &file.file, 0, len).map_err(|e| copy_err(raw, e))?;
            let skipped = finish_file(&file, &self.shared.policy)?;
            self.lock().skipped_xattrs += skipped;
            return Ok(len);
        }
        self.reserve_open();
        self.send(Piece {
            file: Arc::new(file),
            at: 0,
            data: Vec::new(),
            from: Some((src, off, len)),
        });
        Ok(len)
    }

    /// Wait for room for one more open file.
    fn reserve_open(&mut self) {
        let mut st = self.lock();
        while st.open >= MAX_OPEN && !self.failed() {
            st.reader_waits = true;
            self.shared.work.notify_all();
            st = self.shared.room.wait(st).expect("writers poisoned");
        }
        st.open += 1;
    }

    /// One writer: each piece written as it is read, the metadata last.
    fn file_inline(
        &mut self,
        file: &OpenFile,
        data: &mut impl Read,
        chunks: &[(u64, u64)],
    ) -> Result<u64, ExtractError> {
        let raw = &file.raw;
        let mut total = 0u64;
        self.buf.resize(PIECE.min(256 * 1024), 0);
        for &(off, len) in chunks {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(self.buf.len() as u64) as usize;
                data.read_exact(&mut self.buf[..n])
                    .map_err(|e| data_err(raw, e))?;
                write_at(&file.file, &self.buf[..n], off + done)
                    .map_err(|e| entry_err(raw, format!("writing data: {e}")))?;
                done += n as u64;
            }
            total += len;
        }
        let skipped = finish_file(file, &self.shared.policy)?;
        self.shared
            .state
            .lock()
            .expect("writers poisoned")
            .skipped_xattrs += skipped;
        Ok(total)
    }

    /// Wait for every file handed over to be written, stop the writers, and say how many
    /// xattrs were skipped, or the earliest entry's error (and its place in the archive).
    pub(crate) fn finish(&mut self) -> Result<u64, (u64, ExtractError)> {
        {
            let mut st = self.lock();
            st.closed = true;
        }
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            // A writer that panicked is a bug: say so rather than hide it.
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p);
            }
        }
        let mut st = self.lock();
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(std::mem::take(&mut st.skipped_xattrs)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("writers poisoned")
    }

    /// A buffer of `n` bytes to read a piece into: a big one comes back from the writers.
    fn take_buf(&mut self, n: usize) -> Vec<u8> {
        if n < POOLED {
            return vec![0; n];
        }
        let mut b = self
            .lock()
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(PIECE));
        b.resize(n, 0);
        b
    }

    fn send(&mut self, piece: Piece) {
        let n = piece.data.len();
        let mut st = self.lock();
        // One piece always fits, however big: the queue only waits when it holds something.
        while st.bytes > 0 && st.bytes + n > MAX_QUEUED && !self.failed() {
            st.reader_waits = true;
            self.shared.work.notify_all();
            st = self.shared.room.wait(st).expect("writers poisoned");
        }
        st.bytes += n;
        // A copy from the archive names its bytes without carrying them.
        let copies = piece.from.as_ref().map_or(0, |&(_, _, len)| len as usize);
        st.queue.push_back(piece);
        let wake = st.idle_writers > 0
            && (st.queue.len() >= WAKE_PIECES || st.bytes + copies >= WAKE_BYTES);
        drop(st);
        if wake {
            self.shared.work.notify_one();
        }
    }
}

impl Drop for Writers {
    /// On an early return (an error while reading), stop the writers before the extraction
    /// ends: they must not outlive it (nor the umask it set).
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.failed.store(true, Ordering::Relaxed);
            let _ = self.finish();
        }
    }
}

/// A writer thread: write pieces until the queue is closed and empty.
fn writer(shared: &Shared) {
    // Bytes written since the last lock, given back with the next one.
    let mut freed = 0usize;
    let mut spare: Option<Vec<u8>> = None;
    loop {
        let piece = {
            let mut st = shared.state.lock().expect("writers poisoned");
            st.bytes -= freed;
            if let Some(b) = spare.take()
                && st.spare.len() < MAX_SPARE
            {
                st.spare.push(b);
            }
            if st.reader_waits {
                st.reader_waits = false;
                shared.room.notify_one();
            }
            loop {
                if let Some(p) = st.queue.pop_front() {
                    break Some(p);
                }
                if st.closed {
                    break None;
                }
                st.idle_writers += 1;
                st = shared.work.wait(st).expect("writers poisoned");
                st.idle_writers -= 1;
            }
        };
        let Some(piece) = piece else { return };
        freed = piece.data.len();
        let f = &piece.file;
        // After a failure the rest is dropped unwritten: the extraction fails as a whole.
        let (finished, res) = if shared.failed.load(Ordering::Relaxed) {
            (false, Ok(0))
        } else {
            write_piece(&piece, shared)
        };
        match res {
            Ok(skipped) => {
                if skipped > 0 || finished {
                    let mut st = shared.state.lock().expect("writers poisoned");
                    st.skipped_xattrs += skipped;
                    if finished {
                        st.open -= 1;
                        if st.reader_waits {
                            st.reader_waits = false;
                            shared.room.notify_one();
                        }
                    }
                }
            }
            Err(e) => {
                shared.failed.store(true, Ordering::Relaxed);
                let mut st = shared.state.lock().expect("writers poisoned");
                if st.error.as_ref().is_none_or(|(s, _)| f.seq < *s) {
                    st.error = Some((f.seq, e));
                }
                // The reader may be waiting for room: it stops now.
                shared.room.notify_all();
            }
        }
        if piece.data.capacity() == PIECE {
            spare = Some(piece.data);
        }
    }
}

/// Write one piece; the last piece of a file finishes it. Says whether it did, and returns
/// the xattrs skipped. A copy is made in steps of [`COPY_STEP`], and stops (the file never
/// finishes) once the extraction failed: one writer copies a whole file, however big.
fn write_piece(piece: &Piece, shared: &Shared) -> (bool, Result<u64, ExtractError>) {
    let f = &piece.file;
    let res = match &piece.from {
        None => write_at(&f.file, &piece.data, piece.at)
            .map_err(|e| entry_err(&f.raw, format!("writing data: {e}"))),
        Some((src, off, len)) => {
            let mut done = 0u64;
            while done < *len {
                if shared.failed.load(Ordering::Relaxed) {
                    return (false, Ok(0));
                }
                let n = (len - done).min(COPY_STEP);
                if let Err(e) = copy_range(src, off + done, &f.file, piece.at + done, n) {
                    return (false, Err(copy_err(&f.raw, e)));
                }
                done += n;
            }
            Ok(())
        }
    };
    if let Err(e) = res {
        return (false, Err(e));
    }
    if f.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
        return (true, finish_file(f, &shared.policy));
    }
    (false, Ok(0))
}

/// A file's data is in: its full size (sparse), then its metadata (the permission bits came
/// with the create, so no chmod unless it needs one).
fn finish_file(f: &OpenFile, policy: &MetaPolicy) -> Result<u64, ExtractError> {
    if let Some(size) = f.size {
        f.file.set_len(size).map_err(|e| entry_err(&f.raw, e))?;
    }
    let how = policy.how(Perms::Created, true);
    let done = apply::apply(Target::Fd(f.file.as_fd()), &f.meta, &how)
        .map_err(|e| apply_err(&f.raw, e))?;
    Ok(done.skipped_xattrs)
}

/// A plain tar file read for its headers, whose bigger files the writers copy straight from it
/// (`copy_file_range`: one copy, page cache to page cache, instead of a read into memory and a
/// write out of it). The extractor's thread [`Direct::claim`]s an entry's data; this reader
/// then passes over it.
pub(crate) struct DirectFile {
    direct: Direct,
    buf: Vec<u8>,
    /// The unread part of `buf`.
    at: usize,
    end: usize,
    progress: Option<Arc<crate::progress::Progress>>,
}

/// The extractor's side of a [`DirectFile`].
#[derive(Clone)]
pub(crate) struct Direct(std::rc::Rc<DirectState>);

pub(crate) struct DirectState {
    file: Arc<File>,
    len: u64,
    /// Bytes of the stream given out or passed over: where the next byte comes from.
    pos: std::cell::Cell<u64>,
    /// Bytes claimed that the reader has not passed over yet.
    skip: std::cell::Cell<u64>,
}

/// Files smaller than this are read with their headers (one read for many small files).
pub(crate) const DIRECT_MIN: u64 = 64 << 10;

impl DirectFile {
    pub(crate) fn new(
        file: File,
        progress: Option<Arc<crate::progress::Progress>>,
    ) -> io::Result<(DirectFile, Direct)> {
        let len = file.metadata()?.len();
        let direct = Direct(std::rc::Rc::new(DirectState {
            file: Arc::new(file),
            len,
            pos: std::cell::Cell::new(0),
            skip: std::cell::Cell::new(0),
        }));
        let r = DirectFile {
            direct: direct.clone(),
            buf: vec![0; 128 << 10],
            at: 0,
            end: 0,
            progress,
        };
        Ok((r, direct))
    }
}

impl Direct {
    /// The next `n` bytes of the stream, if the file holds them all: the offset they are at.
    /// The reader passes over them. (A truncated archive is read as usual, and says so.)
    pub(crate) fn claim(&self, n: u64) -> Option<(Arc<File>, u64)> {
        let st = &self.0;
        let at = st.pos.get() + st.skip.get();
        if at.checked_add(n)? > st.len {
            return None;
        }
        st.skip.set(st.skip.get() + n);
        Some((st.file.clone(), at))
    }
}

impl Read for DirectFile {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let st = &self.direct.0;
        let skip = st.skip.replace(0);
        if skip > 0 {
            let in_buf = skip.min((self.end - self.at) as u64) as usize;
            self.at += in_buf;
            // Past the buffer: the next read starts further on.
            let past = skip - in_buf as u64;
            if past > 0 {
                self.at = 0;
                self.end = 0;
            }
            st.pos.set(st.pos.get() + skip);
            if let Some(p) = &self.progress {
                p.inc(skip);
            }
        }
        if self.at == self.end {
            // The file offset of the buffer's end is where the stream is.
            let from = st.pos.get();
            let n = loop {
                match rustix::io::pread(&*st.file, &mut self.buf, from) {
                    Ok(n) => break n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            };
            self.at = 0;
            self.end = n;
        }
        let n = out.len().min(self.end - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        st.pos.set(st.pos.get() + n as u64);
        if let Some(p) = &self.progress {
            p.inc(n as u64);
        }
        Ok(n)
    }
}

fn copy_err(raw: &[u8], e: io::Error) -> ExtractError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        data_err(raw, e)
    } else {
        entry_err(raw, format!("copying data: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "OVL_TEST_OPEN_FILE_LIMIT_CHILD";
    fn policy() -> MetaPolicy {
        MetaPolicy {
            opts: crate::extract::ExtractOptions {
                opaque_ns: crate::whiteout::XattrNs::User,
                owners: crate::extract::OwnerPolicy::Record,
                shift: None,
                writers: 2,
            },
            creator: None,
        }
    }

    fn meta() -> Meta {
        let t = rustix::fs::Timespec {
            tv_sec: 1_600_000_000,
            tv_nsec: 0,
        };
        Meta {
            uid: 0,
            gid: 0,
            mode: 0o644,
            mtime: t,
            atime: t,
            xattrs: Vec::new(),
        }
    }

    /// One writer copies a whole file out of the archive, gigabytes maybe: it stops when the
    /// extraction failed meanwhile (another writer, or the reader), as the writers did when
    /// such a file went over in pieces, and does not make the failed import wait for the rest.
    #[test]
    fn a_failure_elsewhere_stops_a_copy_under_way() {
        let t = tempfile::tempdir().unwrap();
        // Holes: nothing to write here, but a copy writes them out (the copy in the failing
        // case is a gigabyte of zeros).
        let len = 1u64 << 30;
        File::create(t.path().join("archive"))
            .unwrap()
            .set_len(len)
            .unwrap();
        let archive = Arc::new(File::open(t.path().join("archive")).unwrap());
        let big = File::create(t.path().join("big")).unwrap();
        let mut pool = Writers::new(2, policy()).unwrap();
        pool.copy(
            big.try_clone().unwrap().into(),
            (archive, 0),
            len,
            meta(),
            b"big",
            0,
        )
        .unwrap();
        // A writer took it and is copying.
        while !pool.lock().queue.is_empty() {
            std::thread::yield_now();
        }
        // A file the other writer cannot write (a read-only descriptor): it fails.
        File::create(t.path().join("bad")).unwrap();
        let ro = File::open(t.path().join("bad")).unwrap();
        pool.file(
            ro.into(),
            &mut &b"x"[..],
            &[(0, 1)],
            None,
            meta(),
            b"bad",
            1,
        )
        .unwrap();
        let (seq, err) = pool.finish().unwrap_err();
        assert_eq!(seq, 1, "the failing file's error: {err}");
        let copied = big.metadata().unwrap().len();
        assert!(
            copied < len,
            "the copy went on to the end after the failure"
        );
    }

    const NAME: &str = "writers::tests::a_pool_with_threads_raises_the_soft_open_file_limit";

    /// A pool with threads raises the soft limit on open files to the hard one (`--jobs N`
    /// pools hold up to N x [`MAX_OPEN`] files). The raise happens once per process, so the
    /// test runs itself again in a child process, with a low soft limit set before the pool.
    #[test]
    fn a_pool_with_threads_raises_the_soft_open_file_limit() {
        use rustix::process::{Resource, getrlimit, setrlimit};
        if ovl_tests::in_child_process(NAME, CHILD, &["1"]).is_none() {
            return;
        }
        let mut limit = getrlimit(Resource::Nofile);
        let hard = limit.maximum.expect("a finite hard limit on open files");
        assert!(hard > 64, "hard limit {hard}");
        limit.current = Some(64);
        setrlimit(Resource::Nofile, limit).unwrap();
        let mut pool = Writers::new(2, policy()).unwrap();
        pool.finish().map_err(|(_, e)| e).unwrap();
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
    }
}
