//! The OCI image layout, read and written: the one place its rules live.
//!
//! Owns what a layout may contain and how ovl touches it: digests are parsed and checked once
//! ([`digest`]) before they name any file; the JSON documents are small typed structs that keep
//! every field they do not model ([`spec`]); the layout is a directory fd, and every file in it
//! is reached from that fd without following a symlink, read only if it is a regular file of
//! bounded size whose length and digest are what its descriptor says, and nested image indexes
//! are followed only so deep ([`layout`]); every file ovl writes into a layout is an exclusive
//! temporary file at an unguessable name, synced and renamed into place, under an flock of the
//! layout when `index.json` changes ([`write`]). `ovl-import oci:DIR[:TAG]` reads through it,
//! `ovl-diff --oci-layout DIR[:TAG]` appends through it.

pub(crate) mod digest;
pub(crate) mod layout;
pub(crate) mod spec;
pub(crate) mod write;

use std::path::PathBuf;

pub(crate) use digest::{Algorithm, Digest, VerifyingReader};
pub(crate) use layout::{Layout, MAX_INDEX_DEPTH, MAX_JSON};
pub(crate) use spec::{Descriptor, Index, Manifest};

/// What is wrong with a layout (or with reaching it). Names are relative to the layout (the
/// tools say which layout).
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{name}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}: not a regular file ({kind})")]
    NotRegular { name: String, kind: &'static str },
    #[error("{name}: not a directory ({kind})")]
    NotADirectory { name: String, kind: &'static str },
    #[error("{name}: {size} bytes, more than the {} MiB a manifest, index or config may have", MAX_JSON >> 20)]
    TooLarge { name: String, size: u64 },
    #[error("blob {digest}: {actual} bytes, but its descriptor says {expected}")]
    WrongSize {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {expected} does not match its digest (its bytes are {actual})")]
    WrongDigest { expected: Digest, actual: Digest },
    #[error("{name}")]
    Json {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "image index {digest}: image indexes nested more than {} deep",
        MAX_INDEX_DEPTH
    )]
    TooDeep { digest: Digest },
    #[error("no image tagged {tag:?} (tags: {tags})")]
    NoTag { tag: String, tags: String },
    #[error("index.json lists no image")]
    NoImage,
    #[error("several images: name one as DIR:TAG (tags: {tags})")]
    Ambiguous { tags: String },
    #[error("no {os}/{arch} image in the image index {digest}")]
    NoPlatform {
        digest: Digest,
        os: &'static str,
        arch: &'static str,
    },
    #[error(
        "the image {0} is an image index (several platforms): ovl can only append to an image manifest"
    )]
    IsIndex(String),
    #[error("not an OCI image layout (no oci-layout file) and not empty")]
    NotALayout,
}

pub(crate) fn io_err(name: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
    let name = name.into();
    move |source| OciError::Io { name, source }
}

/// `DIR[:TAG]`, as the tools take a layout on their command lines (`oci:` already stripped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRef {
    pub dir: PathBuf,
    pub tag: Option<String>,
}

impl LayoutRef {
    /// The part after the last `:` is a tag when it is not empty, holds no `/`, and leaves a
    /// directory name before it; otherwise the whole argument is the directory.
    pub fn parse(arg: &std::ffi::OsStr) -> LayoutRef {
        use std::os::unix::ffi::OsStrExt;
        let s = arg.as_bytes();
        if let Some(i) = s.iter().rposition(|&c| c == b':') {
            let (dir, tag) = (&s[..i], &s[i + 1..]);
            if !tag.is_empty() && !tag.contains(&b'/') && !dir.is_empty() {
                return LayoutRef {
                    dir: PathBuf::from(std::ffi::OsStr::from_bytes(dir)),
                    tag: Some(String::from_utf8_lossy(tag).into_owned()),
                };
            }
        }
        LayoutRef {
            dir: PathBuf::from(arg),
            tag: None,
        }
    }
}

/// The OCI name of the architecture this binary runs on (`amd64`, `arm64`, ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_refs() {
        let r = |s: &str| LayoutRef::parse(s.as_ref());
        let lr = |d: &str, t: Option<&str>| LayoutRef {
            dir: d.into(),
            tag: t.map(Into::into),
        };
        assert_eq!(r("img:v1"), lr("img", Some("v1")));
        assert_eq!(r("./a:b/c"), lr("./a:b/c", None));
        assert_eq!(r("img"), lr("img", None));
        assert_eq!(r("img:"), lr("img:", None));
        assert_eq!(r(":v1"), lr(":v1", None));
        assert_eq!(r("a:b:c"), lr("a:b", Some("c")));
    }
}
