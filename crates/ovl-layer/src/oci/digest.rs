//! Content digests as OCI descriptors carry them: `ALGORITHM:HEX`.
//!
//! Owns which digests ovl accepts and checks: sha256 and sha512, with lowercase hex of exactly
//! the length the algorithm gives. A [`Digest`] is checked once, when parsed, and is then safe
//! to use as a file name under `blobs/ALGORITHM/`: nothing else (`sha256:/etc/hostname`,
//! `sha256:../../dev/zero`) gets that far. [`VerifyingReader`] checks that a blob streamed
//! through it has the length and digest its descriptor promised.

use std::fmt;
use std::io::{self, Read};

use sha2::Digest as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// The name in a digest and the directory under `blobs/`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A checked digest: a known algorithm and lowercase hex of its exact length.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

/// Why a string is not a digest. The string is kept short and printed escaped: it comes from
/// a file someone else wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a digest: {why}")]
pub struct DigestError {
    text: String,
    why: &'static str,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let bad = |why| DigestError {
            text: s.chars().take(80).collect(),
            why,
        };
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| bad("no ALGORITHM: prefix"))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(bad("only sha256 and sha512 are supported")),
        };
        if !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad("not lowercase hex"));
        }
        if hex.len() != algorithm.hex_len() {
            return Err(bad("the hex has the wrong length"));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// The digest of `bytes` with `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = Hasher::new(algorithm);
        h.update(bytes);
        h.finish()
    }

    /// A sha256 digest from its raw bytes.
    pub fn from_sha256(raw: [u8; 32]) -> Digest {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex::encode(raw),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex part: the blob's file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// sha256 or sha512, incrementally.
#[derive(Clone)]
pub(crate) enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub(crate) fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    pub(crate) fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hasher::Sha256(_) => "Hasher(sha256)",
            Hasher::Sha512(_) => "Hasher(sha512)",
        })
    }
}

/// Hashes and counts everything read through it. Past the promised size, or at the end with
/// another length or digest, the read fails (`InvalidData`): a bad blob is an error, never a
/// wrong layer. Whoever reads must read to the end for the check to happen.
#[derive(Debug)]
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Option<Hasher>,
    expected: Digest,
    size: u64,
    seen: u64,
}

impl<R> VerifyingReader<R> {
    pub fn new(inner: R, expected: Digest, size: u64) -> Self {
        VerifyingReader {
            inner,
            hasher: Some(Hasher::new(expected.algorithm)),
            expected,
            size,
            seen: 0,
        }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        if n > 0 {
            self.seen += n as u64;
            if self.seen > self.size {
                return Err(bad(format!(
                    "blob {}: more than the {} bytes its descriptor says",
                    self.expected, self.size
                )));
            }
            if let Some(h) = &mut self.hasher {
                h.update(&buf[..n]);
            }
        } else if let Some(h) = self.hasher.take_if(|_| !buf.is_empty()) {
            if self.seen != self.size {
                return Err(bad(format!(
                    "blob {}: {} bytes, but its descriptor says {}",
                    self.expected, self.seen, self.size
                )));
            }
            let got = h.finish();
            if got != self.expected {
                return Err(bad(format!(
                    "digest mismatch: expected {}, got {got}",
                    self.expected
                )));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC256: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn digests_are_checked_when_parsed() {
        let d = Digest::parse(ABC256).unwrap();
        assert_eq!(d, Digest::of(Algorithm::Sha256, b"abc"));
        assert_eq!(d.to_string(), ABC256);
        let d512 = Digest::of(Algorithm::Sha512, b"abc");
        assert_eq!(Digest::parse(&d512.to_string()).unwrap(), d512);
        assert_eq!(d512.hex().len(), 128);
        for bad in [
            "sha256:/etc/hostname",
            "sha256:../../dev/zero",
            "sha256:",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad/",
            "sha384:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "md5:900150983cd24fb0d6963f7d28e17f72",
        ] {
            let e = Digest::parse(bad).unwrap_err();
            assert!(e.to_string().contains("is not a digest"), "{bad}: {e}");
        }
        let json: Result<Digest, _> = serde_json::from_str(r#""sha256:../../dev/zero""#);
        assert!(json.unwrap_err().to_string().contains("../../dev/zero"));
        let back: Digest = serde_json::from_str(&format!("\"{ABC256}\"")).unwrap();
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            format!("\"{ABC256}\"")
        );
    }

    #[test]
    fn verifying_reader_checks_length_and_digest() {
        let good = Digest::of(Algorithm::Sha256, b"abc");
        let read = |data: &'static [u8], size| {
            let mut out = Vec::new();
            VerifyingReader::new(data, good.clone(), size)
                .read_to_end(&mut out)
                .map_err(|e| e.to_string())
        };
        assert_eq!(read(b"abc", 3), Ok(3));
        assert!(read(b"abd", 3).unwrap_err().contains("digest mismatch"));
        assert!(
            read(b"abc", 2)
                .unwrap_err()
                .contains("more than the 2 bytes")
        );
        assert!(read(b"abc", 4).unwrap_err().contains("descriptor says 4"));
        let d512 = Digest::of(Algorithm::Sha512, b"abc");
        let mut out = Vec::new();
        VerifyingReader::new(&b"abc"[..], d512, 3)
            .read_to_end(&mut out)
            .unwrap();
    }
}
