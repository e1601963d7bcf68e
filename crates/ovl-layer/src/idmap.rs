//! Id maps between container ids and host ids.
//!
//! Owns the one rule set every tool uses for rootless ids: how a user's subordinate ranges
//! (/etc/subuid, /etc/subgid) become a user-namespace map (container 0 is the user itself,
//! container 1..=65536 are the first 65536 subordinate ids), and how ids are translated in both
//! directions with that map (import and mount go container -> host, diff goes host -> container).
//! Also the one parser of `--uidmap CONTAINER:HOST:COUNT` / `--gidmap ...`, the same syntax in
//! every tool ([`IdRange`]'s `FromStr`, [`shift_maps`]).

use std::path::Path;

/// How many container ids a rootless map covers above container root.
pub const ROOTLESS_RANGE: u32 = 65536;

/// One contiguous run of ids: `container..container+count` is `host..host+count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub container: u32,
    pub host: u32,
    pub count: u32,
}

/// Why a `--uidmap`/`--gidmap` value or list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdMapError {
    #[error(
        "{0:?}: an id map is CONTAINER:HOST:COUNT, three decimal numbers (e.g. 0:100000:65536)"
    )]
    Syntax(String),
    #[error("{0:?}: COUNT must be at least 1")]
    Empty(String),
    #[error("{0:?}: the range runs past the last id (4294967294)")]
    TooLong(String),
    #[error(
        "--{which} ranges {a} and {b} overlap on the {side} side (the kernel refuses such a map)"
    )]
    Overlap {
        which: &'static str,
        a: IdRange,
        b: IdRange,
        side: &'static str,
    },
    #[error("--{0} has more than 340 ranges (the kernel's limit)")]
    TooMany(&'static str),
}

impl std::fmt::Display for IdRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.container, self.host, self.count)
    }
}

impl std::str::FromStr for IdRange {
    type Err = IdMapError;

    /// `CONTAINER:HOST:COUNT`, as `--uidmap`/`--gidmap` take it (podman's and umoci's syntax).
    fn from_str(s: &str) -> Result<Self, IdMapError> {
        let f: Vec<&str> = s.split(':').collect();
        let num = |x: &str| -> Result<u32, IdMapError> {
            if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
                return Err(IdMapError::Syntax(s.to_string()));
            }
            x.parse().map_err(|_| IdMapError::TooLong(s.to_string()))
        };
        let [c, h, n] = f[..] else {
            return Err(IdMapError::Syntax(s.to_string()));
        };
        let r = IdRange {
            container: num(c)?,
            host: num(h)?,
            count: num(n)?,
        };
        if r.count == 0 {
            return Err(IdMapError::Empty(s.to_string()));
        }
        // u32::MAX is "no id" (chown's "unchanged"): a range may end just below it.
        let fits = |start: u32| u64::from(start) + u64::from(r.count) <= u64::from(u32::MAX);
        if !fits(r.container) || !fits(r.host) {
            return Err(IdMapError::TooLong(s.to_string()));
        }
        Ok(r)
    }
}

/// The uid and gid maps of `--uidmap` / `--gidmap` (each repeatable): `None` when neither was
/// given. Given one without the other, it maps both (as podman does).
pub fn shift_maps(uid: &[IdRange], gid: &[IdRange]) -> Result<Option<RootlessMaps>, IdMapError> {
    if uid.is_empty() && gid.is_empty() {
        return Ok(None);
    }
    let (uid, gid) = match (uid.is_empty(), gid.is_empty()) {
        (false, true) => (uid, uid),
        (true, false) => (gid, gid),
        _ => (uid, gid),
    };
    Ok(Some(RootlessMaps {
        uid: IdMap::checked(uid.to_vec(), "uidmap")?,
        gid: IdMap::checked(gid.to_vec(), "gidmap")?,
    }))
}

/// A list of id ranges, as written to /proc/PID/uid_map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdMap {
    ranges: Vec<IdRange>,
}

impl IdMap {
    pub fn new(ranges: Vec<IdRange>) -> Self {
        Self { ranges }
    }

    /// A map from `--uidmap`/`--gidmap` ranges, refused when two ranges overlap on either side
    /// (the kernel would refuse to write it) or there are more than the kernel takes.
    pub fn checked(ranges: Vec<IdRange>, which: &'static str) -> Result<Self, IdMapError> {
        if ranges.len() > 340 {
            return Err(IdMapError::TooMany(which));
        }
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                let over = |x: u32, y: u32| {
                    let (x, y) = (u64::from(x), u64::from(y));
                    x < y + u64::from(b.count) && y < x + u64::from(a.count)
                };
                for (side, hit) in [
                    ("container", over(a.container, b.container)),
                    ("host", over(a.host, b.host)),
                ] {
                    if hit {
                        return Err(IdMapError::Overlap {
                            which,
                            a: *a,
                            b: *b,
                            side,
                        });
                    }
                }
            }
        }
        Ok(Self::new(ranges))
    }

    /// The identity map over every id (what real root sees).
    pub fn identity() -> Self {
        Self::new(vec![IdRange {
            container: 0,
            host: 0,
            count: u32::MAX,
        }])
    }

    /// Container root is `host`, nothing else is mapped.
    pub fn single(host: u32) -> Self {
        Self::new(vec![IdRange {
            container: 0,
            host,
            count: 1,
        }])
    }

    pub fn ranges(&self) -> &[IdRange] {
        &self.ranges
    }

    /// True when only container root is mapped.
    pub fn is_single(&self) -> bool {
        self.ranges.iter().map(|r| u64::from(r.count)).sum::<u64>() <= 1
    }

    pub fn to_host(&self, container: u32) -> Option<u32> {
        self.ranges.iter().find_map(|r| {
            let off = container.checked_sub(r.container)?;
            (off < r.count).then(|| r.host + off)
        })
    }

    pub fn to_container(&self, host: u32) -> Option<u32> {
        self.ranges.iter().find_map(|r| {
            let off = host.checked_sub(r.host)?;
            (off < r.count).then(|| r.container + off)
        })
    }

    /// The arguments newuidmap/newgidmap take after the pid: `container host count` triples.
    pub fn to_args(&self) -> Vec<String> {
        self.ranges
            .iter()
            .flat_map(|r| {
                [
                    r.container.to_string(),
                    r.host.to_string(),
                    r.count.to_string(),
                ]
            })
            .collect()
    }

    /// The text of /proc/PID/uid_map for this map.
    pub fn to_proc_text(&self) -> String {
        self.ranges
            .iter()
            .map(|r| format!("{} {} {}\n", r.container, r.host, r.count))
            .collect()
    }

    /// Parse the text of /proc/PID/uid_map.
    pub fn parse_proc(text: &str) -> Option<Self> {
        let mut ranges = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<u32> = line
                .split_whitespace()
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?;
            if f.len() != 3 {
                return None;
            }
            ranges.push(IdRange {
                container: f[0],
                host: f[1],
                count: f[2],
            });
        }
        Some(Self::new(ranges))
    }
}

/// A subordinate id range from /etc/subuid or /etc/subgid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRange {
    pub start: u32,
    pub count: u32,
}

/// The subordinate ranges of a user (matched by name or by numeric id) in a subuid/subgid file.
/// A missing file means no ranges.
pub(crate) fn subordinate_ranges(
    file: &Path,
    user: &str,
    id: u32,
) -> std::io::Result<Vec<SubRange>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(parse_subordinate(&text, user, id))
}

/// Parse the `name:start:count` lines of a subuid/subgid file for one user.
pub(crate) fn parse_subordinate(text: &str, user: &str, id: u32) -> Vec<SubRange> {
    let id = id.to_string();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (who, start, count) = (f.next()?, f.next()?, f.next()?);
            if who != user && who != id {
                return None;
            }
            Some(SubRange {
                start: start.parse().ok()?,
                count: count.parse().ok()?,
            })
        })
        .filter(|r| r.count > 0)
        .collect()
}

/// The map a rootless ovl process uses: container 0 is `own`, container 1.. are the first
/// [`ROOTLESS_RANGE`] subordinate ids (over several ranges if the file splits them).
/// Without subordinate ids it is the single-id map.
pub fn rootless_map(own: u32, subs: &[SubRange]) -> IdMap {
    let mut ranges = vec![IdRange {
        container: 0,
        host: own,
        count: 1,
    }];
    let mut next = 1u32;
    for s in subs {
        let want = ROOTLESS_RANGE + 1 - next;
        if want == 0 {
            break;
        }
        let count = s.count.min(want);
        ranges.push(IdRange {
            container: next,
            host: s.start,
            count,
        });
        next += count;
    }
    IdMap::new(ranges)
}

/// A uid and a gid map: the calling user's rootless maps (from /etc/subuid and /etc/subgid), or
/// the maps a process runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootlessMaps {
    pub uid: IdMap,
    pub gid: IdMap,
}

impl RootlessMaps {
    /// True when both maps have subordinate ids (not just the user's own id).
    pub fn has_subordinate_ids(&self) -> bool {
        !self.uid.is_single() && !self.gid.is_single()
    }

    /// Maps for the current user from the system files.
    pub fn for_current_user() -> std::io::Result<Self> {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let name = user_name(uid).unwrap_or_else(|| uid.to_string());
        Self::for_user(
            &name,
            uid,
            gid,
            Path::new("/etc/subuid"),
            Path::new("/etc/subgid"),
        )
    }

    pub fn for_user(
        name: &str,
        uid: u32,
        gid: u32,
        subuid: &Path,
        subgid: &Path,
    ) -> std::io::Result<Self> {
        let su = subordinate_ranges(subuid, name, uid)?;
        let sg = subordinate_ranges(subgid, name, uid)?;
        if su.is_empty() || sg.is_empty() {
            // A half map (uids but no gids) would make chown fail half the time: use neither.
            return Ok(Self {
                uid: IdMap::single(uid),
                gid: IdMap::single(gid),
            });
        }
        Ok(Self {
            uid: rootless_map(uid, &su),
            gid: rootless_map(gid, &sg),
        })
    }
}

/// The login name of a uid, from /etc/passwd.
pub fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    let want = uid.to_string();
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        (f.next()? == want).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootless_map_covers_65536_ids_over_split_ranges() {
        let subs = parse_subordinate(
            "alice:100000:1000\n1001:300000:70000\nbob:5:5\n",
            "alice",
            1001,
        );
        assert_eq!(subs.len(), 2);
        let m = rootless_map(1001, &subs);
        assert_eq!(m.to_host(0), Some(1001));
        assert_eq!(m.to_host(1), Some(100000));
        assert_eq!(m.to_host(1000), Some(100999));
        assert_eq!(m.to_host(1001), Some(300000));
        assert_eq!(m.to_host(65536), Some(300000 + 65535 - 1000));
        assert_eq!(m.to_host(65537), None);
        assert_eq!(m.to_container(100041), Some(42));
        assert_eq!(m.to_container(1001), Some(0));
        assert_eq!(m.to_container(0), None);
    }

    #[test]
    fn uidmap_arguments_parse_and_are_checked() {
        let r: IdRange = "0:100000:65536".parse().unwrap();
        assert_eq!(
            r,
            IdRange {
                container: 0,
                host: 100000,
                count: 65536
            }
        );
        assert_eq!(r.to_string(), "0:100000:65536");
        for bad in ["", "0:1", "0:1:2:3", "a:1:2", "-1:0:1", "0: 1:2", "+0:1:1"] {
            assert!(
                matches!(bad.parse::<IdRange>(), Err(IdMapError::Syntax(_))),
                "{bad}"
            );
        }
        assert_eq!(
            "0:1:0".parse::<IdRange>(),
            Err(IdMapError::Empty("0:1:0".into()))
        );
        assert!(matches!(
            "0:4294967295:1".parse::<IdRange>(),
            Err(IdMapError::TooLong(_))
        ));
        assert!(matches!(
            "0:1:99999999999".parse::<IdRange>(),
            Err(IdMapError::TooLong(_))
        ));
        "0:4294967294:1".parse::<IdRange>().unwrap();

        let a: IdRange = "0:100000:65536".parse().unwrap();
        let b: IdRange = "65536:200000:10".parse().unwrap();
        let m = shift_maps(&[a, b], &[]).unwrap().unwrap();
        assert_eq!(m.uid, m.gid);
        assert_eq!(m.uid.to_host(42), Some(100042));
        assert_eq!(m.uid.to_host(65537), Some(200001));
        assert_eq!(m.uid.to_container(100042), Some(42));
        assert_eq!(m.uid.to_container(0), None);
        assert_eq!(m.uid.to_proc_text(), "0 100000 65536\n65536 200000 10\n");
        assert_eq!(shift_maps(&[], &[]).unwrap(), None);
        let g = shift_maps(&[], &[b]).unwrap().unwrap();
        assert_eq!(g.uid, IdMap::new(vec![b]));
        let c: IdRange = "10:300000:5".parse().unwrap();
        let e = shift_maps(&[a, c], &[]).unwrap_err();
        assert!(
            e.to_string().contains("overlap on the container side"),
            "{e}"
        );
        let d: IdRange = "70000:100005:5".parse().unwrap();
        let e = shift_maps(&[a], &[a, d]).unwrap_err();
        assert!(
            e.to_string().contains("--gidmap") && e.to_string().contains("host side"),
            "{e}"
        );
    }

    #[test]
    fn single_map_and_proc_roundtrip() {
        let m = IdMap::single(1000);
        assert!(m.is_single());
        assert_eq!(IdMap::parse_proc(&m.to_proc_text()), Some(m.clone()));
        assert_eq!(m.to_args(), ["0", "1000", "1"]);
        assert!(!IdMap::identity().is_single());
        assert_eq!(IdMap::identity().to_host(42), Some(42));
    }
}
