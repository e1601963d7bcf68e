//! Reading and writing extended attributes without following symlinks.
//!
//! Owns the xattr I/O helpers; which xattrs mean what is decided in [`crate::whiteout`].
//!
//! Listing is on the hot path of every tree walk (ovl-diff reads each entry's xattrs to find
//! whiteouts and opaque markers), so it costs one syscall for an entry without xattrs: the
//! list is read into a stack buffer first (the size query is only made when it does not
//! fit), and NAME in DIR is named with `listxattrat`/`getxattrat` (Linux 6.13) instead of a
//! `/proc/self/fd/N/NAME` path that the kernel walks through procfs each time. Older kernels
//! (and seccomp filters that refuse the new calls) get the proc path.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::fsops::proc_path;

/// An extended attribute: its name and its value. The name is bytes as the kernel lists it,
/// not necessarily UTF-8: GNU tar keeps any name (`SCHILY.xattr.<name bytes>`), and so does
/// every tool here. Print one with [`crate::display_bytes`].
pub type Xattr = (Vec<u8>, Vec<u8>);

/// Every xattr of `path` (not following a final symlink), sorted by name.
pub fn list_path(path: &Path) -> io::Result<Vec<Xattr>> {
    collect(
        read_sized(query(
            |b| rustix::fs::llistxattr(path, b),
            || rustix::fs::llistxattr_query(path),
        )),
        |key| {
            read_sized(query(
                |b| rustix::fs::lgetxattr(path, key, b),
                || rustix::fs::lgetxattr_query(path, key),
            ))
        },
    )
}

/// Every xattr of NAME in DIR (not following NAME), sorted by name.
pub(crate) fn list_at(dir: &impl AsRawFd, name: &CStr) -> io::Result<Vec<Xattr>> {
    if AT_CALLS.load(Ordering::Relaxed) {
        let fd = dir.as_raw_fd();
        let listed = read_sized(|b| at::list(fd, name, b));
        if !matches!(&listed, Err(e) if at::unavailable(e)) {
            let got = collect(listed, |key| read_sized(|b| at::get(fd, name, key, b)));
            // A filter that lets one of the two calls through and not the other.
            if !matches!(&got, Err(e) if at::unavailable(e)) {
                return got;
            }
        }
        AT_CALLS.store(false, Ordering::Relaxed);
    }
    list_path(&proc_path(dir, name))
}

/// The xattr names of NAME in DIR (not following NAME), NUL-separated as the kernel lists
/// them; none on a filesystem without xattrs. For a scan that reads values only when a
/// name it looks for is there.
pub(crate) fn names_at(dir: &impl AsRawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut listed = Err(io::Error::from_raw_os_error(libc::ENOSYS));
    if AT_CALLS.load(Ordering::Relaxed) {
        listed = read_sized(|b| at::list(dir.as_raw_fd(), name, b));
        if matches!(&listed, Err(e) if at::unavailable(e)) {
            AT_CALLS.store(false, Ordering::Relaxed);
        }
    }
    if !AT_CALLS.load(Ordering::Relaxed) {
        let path = proc_path(dir, name);
        listed = read_sized(query(
            |b| rustix::fs::llistxattr(&path, b),
            || rustix::fs::llistxattr_query(&path),
        ));
    }
    match listed {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Ok(Vec::new()),
        other => other,
    }
}

/// Whether `listxattrat`/`getxattrat` may work here: cleared by the first call the kernel
/// (or a seccomp filter) refuses.
static AT_CALLS: AtomicBool = AtomicBool::new(true);

/// Every xattr of an open file, sorted by name.
pub fn list_fd(fd: impl AsFd) -> io::Result<Vec<Xattr>> {
    let fd = fd.as_fd();
    let listed = read_sized(query(
        |b| rustix::fs::flistxattr(fd, b),
        || rustix::fs::flistxattr_query(fd),
    ));
    // An O_PATH descriptor (kernels before 6.13 refuse the f*xattr calls on one) is read
    // through its magic link, which resolves to the open file itself; lgetxattr would read
    // the link, so it is followed deliberately.
    if !matches!(&listed, Err(e) if e.raw_os_error() == Some(libc::EBADF)) {
        return collect(listed, |key| {
            read_sized(query(
                |b| rustix::fs::fgetxattr(fd, key, b),
                || rustix::fs::fgetxattr_query(fd, key),
            ))
        });
    }
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    collect(
        read_sized(query(
            |b| rustix::fs::listxattr(&path, b),
            || rustix::fs::listxattr_query(&path),
        )),
        |key| {
            read_sized(query(
                |b| rustix::fs::getxattr(&path, key, b),
                || rustix::fs::getxattr_query(&path, key),
            ))
        },
    )
}

/// What a size-returning xattr call fills: tried with a stack buffer first, then (ERANGE)
/// with the size the kernel asks for, again while the value keeps growing under us. `call`
/// with an empty buffer must return the size needed, as the system calls do (rustix's
/// wrappers return 0 there: they go through [`query`]).
fn read_sized(mut call: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<Vec<u8>> {
    let mut first = [0u8; 1024];
    match call(&mut first) {
        Ok(n) => return Ok(first[..n].to_vec()),
        Err(e) if e.raw_os_error() != Some(libc::ERANGE) => return Err(e),
        Err(_) => {}
    }
    loop {
        let size = call(&mut [])?;
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A rustix xattr call and its size query as one call for [`read_sized`].
fn query(
    mut fill: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
    mut size: impl FnMut() -> rustix::io::Result<usize>,
) -> impl FnMut(&mut [u8]) -> io::Result<usize> {
    move |b| if b.is_empty() { size() } else { fill(b) }.map_err(Into::into)
}

/// The xattrs named in `names` (a NUL-separated list), sorted by name; a filesystem without
/// xattrs has none, and one removed between the list and the read is skipped.
fn collect(
    names: io::Result<Vec<u8>>,
    get: impl Fn(&CStr) -> io::Result<Vec<u8>>,
) -> io::Result<Vec<Xattr>> {
    let names = match names {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for key in names.split(|&b| b == 0).filter(|k| !k.is_empty()) {
        let ckey = CString::new(key).expect("split at NUL");
        match get(&ckey) {
            Ok(v) => out.push((key.to_vec(), v)),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// `listxattrat` and `getxattrat` (Linux 6.13), which neither libc nor rustix wraps yet.
mod at {
    use std::ffi::CStr;
    use std::io;
    use std::os::fd::RawFd;

    // The same numbers on every architecture (the unified syscall table since Linux 5.1).
    const SYS_GETXATTRAT: libc::c_long = 464;
    const SYS_LISTXATTRAT: libc::c_long = 465;

    /// `struct xattr_args` of linux/xattr.h.
    #[repr(C)]
    struct XattrArgs {
        value: u64,
        size: u32,
        flags: u32,
    }

    /// Whether `e` says the call itself is missing (an old kernel, or a seccomp filter,
    /// which answers EPERM in some container runtimes) rather than anything about the file.
    pub(super) fn unavailable(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM))
    }

    fn ret(rc: libc::c_long) -> io::Result<usize> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }

    /// The NUL-separated xattr names of NAME in DIR, not following NAME.
    pub(super) fn list(dir: RawFd, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `name` is NUL-terminated, and the kernel writes at most `buf.len()` bytes
        // to `buf` (none when it is empty, the size query).
        ret(unsafe {
            libc::syscall(
                SYS_LISTXATTRAT,
                dir,
                name.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                buf.as_mut_ptr(),
                buf.len(),
            )
        })
    }

    /// The value of xattr `key` of NAME in DIR, not following NAME.
    pub(super) fn get(dir: RawFd, name: &CStr, key: &CStr, buf: &mut [u8]) -> io::Result<usize> {
        let mut args = XattrArgs {
            value: buf.as_mut_ptr() as u64,
            size: u32::try_from(buf.len()).unwrap_or(u32::MAX),
            flags: 0,
        };
        // SAFETY: both strings are NUL-terminated, `args` is the kernel's struct with its
        // size passed along, and the kernel writes at most `args.size` bytes to `buf`.
        ret(unsafe {
            libc::syscall(
                SYS_GETXATTRAT,
                dir,
                name.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                key.as_ptr(),
                &raw mut args,
                std::mem::size_of::<XattrArgs>(),
            )
        })
    }
}

/// Set an xattr on an open file or directory.
pub(crate) fn set_fd(fd: impl AsFd, name: &[u8], value: &[u8]) -> io::Result<()> {
    rustix::fs::fsetxattr(fd, name, value, rustix::fs::XattrFlags::empty()).map_err(Into::into)
}

/// Set an xattr on NAME in DIR (not following NAME).
pub(crate) fn set_at(dir: &impl AsRawFd, name: &CStr, key: &[u8], value: &[u8]) -> io::Result<()> {
    rustix::fs::lsetxattr(
        proc_path(dir, name),
        key,
        value,
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(Into::into)
}

/// Remove an xattr of an open file or directory.
pub(crate) fn remove_fd(fd: impl AsFd, name: &[u8]) -> io::Result<()> {
    rustix::fs::fremovexattr(fd, name).map_err(Into::into)
}

/// Remove an xattr of NAME in DIR (not following NAME).
pub(crate) fn remove_at(dir: &impl AsRawFd, name: &CStr, key: &[u8]) -> io::Result<()> {
    rustix::fs::lremovexattr(proc_path(dir, name), key).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    /// Names and values past the first buffer (the ERANGE retry), on a file and on a symlink
    /// (its own xattrs, not its target's), read every way there is: the `*at` calls, the proc
    /// path they fall back to, and the open file; all agree with what was set.
    #[test]
    fn every_way_of_listing_reads_what_was_set() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"").unwrap();
        // ext4 holds about 4 KiB of xattrs per inode: many names here, a big value on `g`.
        let want: Vec<Xattr> = (0..40)
            .map(|i| {
                (
                    format!("user.a-rather-long-name-{i:03}").into_bytes(),
                    vec![i as u8; i],
                )
            })
            .collect();
        for (k, v) in &want {
            xattr::set(&f, std::ffi::OsStr::from_bytes(k), v).unwrap();
        }
        assert!(
            want.iter().map(|(k, _)| k.len() + 1).sum::<usize>() > 1024,
            "the names must overflow the first buffer"
        );
        let g = t.path().join("g");
        std::fs::write(&g, b"").unwrap();
        let big = vec![(b"user.big".to_vec(), vec![9u8; 3000])];
        xattr::set(&g, "user.big", &big[0].1).unwrap();
        let l = t.path().join("l");
        std::os::unix::fs::symlink("f", &l).unwrap();
        let dir = std::fs::File::open(t.path()).unwrap();
        let at = |name: &str| list_at(&dir, &CString::new(name).unwrap()).unwrap();

        assert_eq!(at("f"), want);
        assert_eq!(at("g"), big);
        assert_eq!(list_path(&g).unwrap(), big);
        assert_eq!(list_fd(std::fs::File::open(&g).unwrap()).unwrap(), big);
        assert_eq!(at("l"), Vec::new(), "the symlink has none of its own");
        assert_eq!(list_path(&f).unwrap(), want);
        assert_eq!(list_fd(std::fs::File::open(&f).unwrap()).unwrap(), want);
        let names = names_at(&dir, c"f").unwrap();
        let mut listed: Vec<&[u8]> = names.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
        listed.sort();
        let keys: Vec<&[u8]> = want.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(listed, keys);
        let opath =
            rustix::fs::open(&f, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty()).unwrap();
        assert_eq!(list_fd(&opath).unwrap(), want, "an O_PATH descriptor");

        // The fallback for kernels without the *at calls.
        AT_CALLS.store(false, Ordering::Relaxed);
        let (a, n, b) = (at("f"), names_at(&dir, c"f").unwrap(), at("g"));
        AT_CALLS.store(true, Ordering::Relaxed);
        assert_eq!(a, want);
        assert_eq!(b, big);
        assert_eq!(n, names);
    }

    const CHILD: &str = "OVL_TEST_XATTR_SECCOMP_CHILD";
    const NAME: &str = "xattrs::tests::calls_a_seccomp_filter_refuses_fall_back_to_the_proc_path";

    /// Under a seccomp filter that refuses the new calls (a container runtime's profile
    /// older than Linux 6.13 answers ENOSYS or EPERM), listing falls back to the proc path
    /// and reads the same; also when only `getxattrat` is refused. Each case runs in a child
    /// process of this test binary: the filter cannot be lifted, and the fallback, once
    /// taken, is remembered for the process.
    #[test]
    fn calls_a_seccomp_filter_refuses_fall_back_to_the_proc_path() {
        const LISTXATTRAT: u32 = 465;
        const GETXATTRAT: u32 = 464;
        let cases = ["both-ENOSYS", "both-EPERM", "get-EPERM"];
        let Some(case) = ovl_tests::in_child_process(NAME, CHILD, &cases) else {
            return;
        };
        let (refused, errno): (&[u32], i32) = match case.as_str() {
            "both-ENOSYS" => (&[LISTXATTRAT, GETXATTRAT], libc::ENOSYS),
            "both-EPERM" => (&[LISTXATTRAT, GETXATTRAT], libc::EPERM),
            "get-EPERM" => (&[GETXATTRAT], libc::EPERM),
            other => panic!("unknown case {other}"),
        };
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"").unwrap();
        xattr::set(&f, "user.a", b"1").unwrap();
        xattr::set(&f, "user.b", b"22").unwrap();
        let dir = std::fs::File::open(t.path()).unwrap();
        let want = vec![
            (b"user.a".to_vec(), b"1".to_vec()),
            (b"user.b".to_vec(), b"22".to_vec()),
        ];
        assert_eq!(list_at(&dir, c"f").unwrap(), want, "before the filter");
        if !ovl_tests::require(
            "listxattrat and getxattrat (Linux 6.13)",
            AT_CALLS.load(Ordering::Relaxed),
        ) {
            return;
        }

        refuse_syscalls(refused, errno);
        assert_eq!(list_at(&dir, c"f").unwrap(), want, "under the filter");
        assert!(
            !AT_CALLS.load(Ordering::Relaxed),
            "the fallback is remembered"
        );
        assert_eq!(names_at(&dir, c"f").unwrap(), b"user.a\0user.b\0");
        assert_eq!(list_at(&dir, c"f").unwrap(), want);
    }

    /// Install a seccomp filter on this thread: the syscalls `nrs` fail with `errno`.
    fn refuse_syscalls(nrs: &[u32], errno: i32) {
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        // Load the syscall number; for each refused one, jump to the last instruction.
        let mut prog = vec![stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0)];
        for (i, &nr) in nrs.iter().enumerate() {
            let to_refuse = (nrs.len() - i) as u8;
            prog.push(libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt: to_refuse,
                jf: 0,
                k: nr,
            });
        }
        prog.push(stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW));
        prog.push(stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | errno as u32,
        ));
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_mut_ptr(),
        };
        // SAFETY: plain prctl calls; `fprog` points at `prog`, alive across the call.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &raw const fprog
                ),
                0,
                "{}",
                io::Error::last_os_error()
            );
        }
    }
}
