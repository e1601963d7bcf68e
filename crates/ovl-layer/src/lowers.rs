//! Lower lists: the one reading and the one writing of overlayfs `lowerdir=` strings.
//!
//! Owns the escaping every tool uses for a list of layers, top first, as the kernel reads it
//! (fs/overlayfs/params.c): layers are separated by `:`, and a backslash makes the next byte
//! literal, so `a\:b` is the one directory `a:b` and `a\\b` is `a\b`. The same backslash
//! protects a `,` in a mount(2) option string (overlayfs splits its options on unescaped commas
//! only), so [`join`] escapes `\`, `:` and `,`: its output is a valid `lowerdir=` value for
//! mount(2), for fsconfig, and for `mount -o`, and a valid `--lower` argument for every ovl tool.
//! A single path ([`escape`]) is escaped the same way for `upperdir=` and `workdir=`.
//!
//! fuse-overlayfs reads its `-o` through libfuse (a backslash protects the next byte, commas
//! split) and then splits `lowerdir=` on every `:` with no escape at all: [`join_fuse`] says so
//! instead of mounting the wrong layers.
//!
//! Names are bytes: nothing here needs UTF-8.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// A lower list that names no layer, or names one wrongly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LowerError {
    #[error("no lower directory given")]
    None,
    #[error(
        "empty layer in the lower list {list:?} (layers are separated by `:`; \
         write `\\:` for a colon in a name)"
    )]
    Empty { list: String },
    #[error(
        "the lower list {list:?} ends in a lone backslash (a backslash escapes the next \
         character: write `\\\\` for a backslash in a name)"
    )]
    TrailingBackslash { list: String },
    #[error("the path {path:?} contains a `:`, which fuse-overlayfs cannot take in a layer path")]
    FuseColon { path: PathBuf },
}

/// Split `s` on `sep` except where a backslash escapes it. With `keep_escapes` the backslash
/// pairs stay for a later split; without, each backslash is dropped and the byte after it kept.
/// A trailing lone backslash stays as it is (the lenient reading for mount tables; [`parse`]
/// refuses it).
pub(crate) fn split_escaped(s: &[u8], sep: u8, keep_escapes: bool) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    let mut i = 0;
    while i < s.len() {
        let cur = out.last_mut().expect("non-empty");
        if s[i] == b'\\' && i + 1 < s.len() {
            let from = if keep_escapes { i } else { i + 1 };
            cur.extend_from_slice(&s[from..i + 2]);
            i += 2;
            continue;
        }
        if s[i] == sep {
            out.push(Vec::new());
        } else {
            cur.push(s[i]);
        }
        i += 1;
    }
    out
}

/// True when `s` ends in a backslash that escapes nothing.
fn ends_in_lone_backslash(s: &[u8]) -> bool {
    s.iter().rev().take_while(|&&c| c == b'\\').count() % 2 == 1
}

/// Parse one `lowerdir=`-style list (`--lower` of every tool): layers top first.
pub fn parse(list: &OsStr) -> Result<Vec<PathBuf>, LowerError> {
    let b = list.as_bytes();
    let shown = || list.to_string_lossy().into_owned();
    if ends_in_lone_backslash(b) {
        return Err(LowerError::TrailingBackslash { list: shown() });
    }
    let layers = split_escaped(b, b':', false);
    if layers.iter().any(Vec::is_empty) {
        return Err(LowerError::Empty { list: shown() });
    }
    Ok(layers
        .into_iter()
        .map(|l| PathBuf::from(OsString::from_vec(l)))
        .collect())
}

/// Parse every value of a repeatable `--lower` and append their layers, top first. At least
/// one layer is required.
pub fn parse_all<I, S>(values: I) -> Result<Vec<PathBuf>, LowerError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut out = Vec::new();
    for v in values {
        out.extend(parse(v.as_ref())?);
    }
    if out.is_empty() {
        return Err(LowerError::None);
    }
    Ok(out)
}

/// One path escaped for an overlayfs option value (`lowerdir=` layer, `upperdir=`, `workdir=`):
/// a backslash before each `\`, `:` and `,`.
pub fn escape(path: &Path) -> OsString {
    let b = path.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(b.len());
    for &c in b {
        if matches!(c, b'\\' | b':' | b',') {
            out.push(b'\\');
        }
        out.push(c);
    }
    OsString::from_vec(out)
}

/// The `lowerdir=` value for `layers`, top first: what [`parse`] reads back as the same paths.
pub fn join<P: AsRef<Path>>(layers: &[P]) -> OsString {
    let mut out = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        if i > 0 {
            out.push(b':');
        }
        out.extend_from_slice(escape(l.as_ref()).as_bytes());
    }
    OsString::from_vec(out)
}

/// One path for a fuse-overlayfs `-o` value: `\` and `,` escaped for libfuse; a `:` refused
/// (fuse-overlayfs splits its layer lists on every colon).
pub fn escape_fuse(path: &Path) -> Result<OsString, LowerError> {
    let b = path.as_os_str().as_bytes();
    if b.contains(&b':') {
        return Err(LowerError::FuseColon {
            path: path.to_path_buf(),
        });
    }
    let mut out = Vec::with_capacity(b.len());
    for &c in b {
        if matches!(c, b'\\' | b',') {
            out.push(b'\\');
        }
        out.push(c);
    }
    Ok(OsString::from_vec(out))
}

/// The fuse-overlayfs `lowerdir=` value for `layers`, top first (see [`escape_fuse`]).
pub fn join_fuse<P: AsRef<Path>>(layers: &[P]) -> Result<OsString, LowerError> {
    let mut out = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        if i > 0 {
            out.push(b':');
        }
        out.extend_from_slice(escape_fuse(l.as_ref())?.as_bytes());
    }
    Ok(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(b: &[u8]) -> &OsStr {
        OsStr::from_bytes(b)
    }

    fn paths(v: &[&[u8]]) -> Vec<PathBuf> {
        v.iter().map(|b| PathBuf::from(os(b))).collect()
    }

    #[test]
    fn escaped_colon_is_part_of_a_name() {
        assert_eq!(parse(os(br"a\:b")).unwrap(), paths(&[b"a:b"]));
        assert_eq!(parse(os(br"a:b")).unwrap(), paths(&[b"a", b"b"]));
        assert_eq!(
            parse(os(br"/x\\:/y\,z")).unwrap(),
            paths(&[br"/x\", b"/y,z"])
        );
        assert_eq!(parse(os(b"/a\xff:/b")).unwrap(), paths(&[b"/a\xff", b"/b"]));
    }

    #[test]
    fn bad_lists_are_refused() {
        for bad in [&b""[..], b":a", b"a:", b"a::b", b"a\\"] {
            assert!(parse(os(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(parse(os(br"a\\")).unwrap(), paths(&[br"a\"]));
        assert_eq!(parse_all(Vec::<OsString>::new()), Err(LowerError::None));
        assert_eq!(
            parse_all([os(b"a:b"), os(b"/c")]).unwrap(),
            paths(&[b"a", b"b", b"/c"])
        );
    }

    #[test]
    fn join_round_trips_through_parse() {
        let layers = paths(&[b"/p", br"/a:b,c\d", b"/\xfe\x01 x", br"\", b"::"]);
        let s = join(&layers);
        assert_eq!(s.as_bytes(), b"/p:/a\\:b\\,c\\\\d:/\xfe\x01 x:\\\\:\\:\\:");
        assert_eq!(parse(&s).unwrap(), layers);
    }

    #[test]
    fn the_mountinfo_reading_agrees_with_parse() {
        // mounts.rs reads a mounted overlay's `lowerdir=` with the same split.
        let layers = paths(&[br"/a:b", br"/c\d", b"/e,f"]);
        let dirs = crate::mounts::dirs_in_options(
            &[b"lowerdir=".as_slice(), join(&layers).as_bytes()].concat(),
        );
        let got: Vec<PathBuf> = dirs.into_iter().map(|d| d.path).collect();
        assert_eq!(got, layers);
    }

    #[test]
    fn fuse_form_refuses_colons_and_escapes_commas() {
        assert_eq!(
            join_fuse(&paths(&[b"/a,b", br"/c\d"])).unwrap().as_bytes(),
            br"/a\,b:/c\\d"
        );
        assert!(matches!(
            join_fuse(&paths(&[b"/a:b"])),
            Err(LowerError::FuseColon { .. })
        ));
    }
}
