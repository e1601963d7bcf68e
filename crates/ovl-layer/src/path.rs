//! Layer paths: the byte names inside a layer, normalised and checked once.
//!
//! A tar member name (or a hardlink target) is split into components: a leading `/` and `./`
//! are dropped (as GNU tar and every OCI implementation do), empty and `.` components vanish,
//! and `..` is refused outright: no layer needs it, and every escape starts with it.

use std::fmt;

/// A normalised relative path inside a layer root. Empty means the root itself.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LayerPath(Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("a `..` component would leave the root")]
    DotDot,
    #[error("the name contains a NUL byte")]
    Nul,
}

impl LayerPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// Normalise a name from a layer.
    pub fn parse(name: &[u8]) -> Result<Self, PathError> {
        if name.contains(&0) {
            return Err(PathError::Nul);
        }
        let mut out = Vec::with_capacity(name.len());
        for comp in name.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => return Err(PathError::DotDot),
                c => {
                    if !out.is_empty() {
                        out.push(b'/');
                    }
                    out.extend_from_slice(c);
                }
            }
        }
        Ok(Self(out))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The parent path and the last component; the root has neither.
    pub fn split_last(&self) -> Option<(LayerPath, &[u8])> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => (LayerPath(self.0[..i].to_vec()), &self.0[i + 1..]),
            None => (LayerPath::root(), &self.0[..]),
        })
    }

    /// The last component (empty for the root).
    pub fn file_name(&self) -> &[u8] {
        self.split_last().map(|(_, n)| n).unwrap_or(b"")
    }

    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/').filter(|c| !c.is_empty())
    }

    /// This path with `name` appended (one component).
    pub fn join(&self, name: &[u8]) -> LayerPath {
        let mut v = self.0.clone();
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        LayerPath(v)
    }

    /// True when `self` is `other` or below it.
    pub fn starts_with(&self, other: &LayerPath) -> bool {
        other.0.is_empty()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }

    /// The path as an OsStr (names are bytes, never decoded).
    pub fn as_os_str(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(&self.0)
    }
}

impl fmt::Debug for LayerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl fmt::Display for LayerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        f.write_str(&display_bytes(&self.0))
    }
}

/// Bytes shown to a person (a name, a link target or a label read from an archive, an image
/// or a directory): the one escaping rule, so no byte from a hostile archive reaches a terminal
/// raw. Printable UTF-8 as is; bytes that are not UTF-8 as `\xNN`; control characters (where a
/// terminal's escape sequences start) as `\xNN` or `\u{NNNN}`, and so are the bidirectional
/// overrides that make text display in another order than it reads.
pub fn display_bytes(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if (c as u32) < 0x80 && c.is_control() {
                let _ = write!(out, "\\x{:02x}", c as u32);
            } else if c.is_control() || bidi {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// [`display_bytes`] of a string.
pub fn display_str(s: &str) -> String {
    display_bytes(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses_dotdot() {
        assert_eq!(
            LayerPath::parse(b"./a//b/./c/").unwrap().as_bytes(),
            b"a/b/c"
        );
        assert_eq!(
            LayerPath::parse(b"/etc/passwd").unwrap().as_bytes(),
            b"etc/passwd"
        );
        assert!(LayerPath::parse(b"./").unwrap().is_root());
        assert_eq!(LayerPath::parse(b"a/../b"), Err(PathError::DotDot));
        assert_eq!(LayerPath::parse(b".."), Err(PathError::DotDot));
        assert_eq!(LayerPath::parse(b"a\0b"), Err(PathError::Nul));
        let p = LayerPath::parse(b"a/b/c").unwrap();
        let (parent, name) = p.split_last().unwrap();
        assert_eq!((parent.as_bytes(), name), (&b"a/b"[..], &b"c"[..]));
        assert!(p.starts_with(&LayerPath::parse(b"a/b").unwrap()));
        assert!(!p.starts_with(&LayerPath::parse(b"a/bc").unwrap()));
        assert_eq!(display_bytes(b"a\xffb"), "a\\xffb");
    }

    #[test]
    fn control_characters_and_bidi_overrides_are_escaped() {
        assert_eq!(display_bytes(b"\x1b[31mred\x07"), "\\x1b[31mred\\x07");
        assert_eq!(
            display_bytes("a\u{9b}b\u{202e}c".as_bytes()),
            "a\\u{009b}b\\u{202e}c"
        );
        assert_eq!(
            display_bytes("tab\tnl\n\x7f".as_bytes()),
            "tab\\x09nl\\x0a\\x7f"
        );
        assert_eq!(display_bytes("bücher/é".as_bytes()), "bücher/é");
    }
}
