//! Process identity: who this process is to the kernel, and what every tool does about it.
//!
//! Owns the one answer to "am I real root": euid 0 *and* the initial user namespace, read from
//! /proc/self/uid_map (the initial namespace shows `0 0 4294967295`). euid 0 alone is not
//! enough: under `unshare -r`, `podman unshare` or `buildah unshare`, and in the namespace ovl
//! makes for itself, the process is root only of a user namespace, so `trusted.*` xattrs are
//! refused and only the ids of that namespace's map can own files. From the identity follow
//! the rules the tools share:
//! - the overlay xattr namespace ([`Identity::xattr_ns`]): `trusted.overlay.*` for real root,
//!   `user.overlay.*` (a `userxattr` mount) for anyone else;
//! - how image owners land ([`Identity::owner_policy`]): chowned, unless the namespace maps a
//!   single id, where they are recorded in xattrs instead ([`crate::owners`]);
//! - whether to run again as root of a new user namespace mapped to the user's subordinate ids
//!   (a plain user) and how ([`Reexec`]; the namespace itself is made by [`crate::userns`]).

use crate::extract::OwnerPolicy;
use crate::idmap::{IdMap, RootlessMaps};
use crate::userns::{self, UsernsPlan};
use crate::whiteout::XattrNs;

/// Who this process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// euid 0 in the initial user namespace.
    RealRoot,
    /// euid 0 in another user namespace (ovl's own re-exec, `unshare -r`, `podman unshare`,
    /// ...), whose id maps (container -> host) these are.
    NamespaceRoot(RootlessMaps),
    /// Any other euid, in any namespace: the tools run again as root of a new user namespace.
    User,
}

impl Identity {
    /// The identity of this process, from its euid and /proc/self/{uid,gid}_map
    /// ([`userns::current_maps`]; when /proc cannot tell, euid 0 counts as real root, as it did
    /// before user namespaces).
    pub fn current() -> Self {
        Self::of(rustix::process::geteuid().as_raw(), userns::current_maps())
    }

    /// The identity of a process with effective uid `euid` and these id maps.
    pub fn of(euid: u32, maps: RootlessMaps) -> Self {
        if euid != 0 {
            Identity::User
        } else if maps.uid != IdMap::identity() {
            Identity::NamespaceRoot(maps)
        } else {
            Identity::RealRoot
        }
    }

    /// euid 0 in the initial user namespace.
    pub fn is_real_root(&self) -> bool {
        *self == Identity::RealRoot
    }

    /// The check every tool makes before it takes `--uidmap`/`--gidmap` (`given`): those maps
    /// name host ids, which only real root may own files as (`why` says what the tool does with
    /// them). A user needs no map: the tools map the caller's subordinate ids themselves.
    pub fn check_explicit_maps(&self, tool: &str, given: bool, why: &str) -> Result<(), String> {
        if !given || self.is_real_root() {
            return Ok(());
        }
        Err(format!(
            "--uidmap/--gidmap need real root ({why}); as a user, {tool} maps your /etc/subuid \
             and /etc/subgid ranges itself"
        ))
    }

    /// Not root of any namespace: must run again as root of a new one to do a tool's work.
    pub fn needs_reexec(&self) -> bool {
        *self == Identity::User
    }

    /// Where this process writes overlay markers, and which a mount it makes reads:
    /// `trusted.overlay.*` needs CAP_SYS_ADMIN in the initial user namespace.
    pub fn xattr_ns(&self) -> XattrNs {
        if self.is_real_root() {
            XattrNs::Trusted
        } else {
            XattrNs::User
        }
    }

    /// How extracted files get the archive's owners: chowned (real root, or a namespace that
    /// maps a range of ids), or, where only one id is mapped (`unshare -r`, a user without
    /// subordinate ids), left to this process and recorded in xattrs (`crate::owners`).
    pub fn owner_policy(&self) -> OwnerPolicy {
        match self {
            Identity::RealRoot => OwnerPolicy::Preserve,
            Identity::NamespaceRoot(m) if !m.uid.is_single() && !m.gid.is_single() => {
                OwnerPolicy::Preserve
            }
            _ => OwnerPolicy::Record,
        }
    }
}

/// How a tool that is not root runs itself again as root of a new user namespace (container 0
/// is the user, 1..=65536 the user's subordinate ids, or only the user without them). Build it
/// and call [`Reexec::root_or_exit`] first thing in `main`:
///
/// ```no_run
/// # use ovl_layer::Reexec;
/// let identity = Reexec::new("ovl-import").root_or_exit();
/// let owners = identity.owner_policy();
/// ```
#[derive(Debug, Clone)]
pub struct Reexec {
    tool: &'static str,
    warn_single: bool,
    adjust: Option<fn(&mut RootlessMaps)>,
    /// `--uidmap`/`--gidmap` given, and why the tool needs real root for them.
    explicit_maps: Option<&'static str>,
}

impl Reexec {
    /// For the tool named `tool` in messages.
    pub fn new(tool: &'static str) -> Self {
        Self {
            tool,
            warn_single: false,
            adjust: None,
            explicit_maps: None,
        }
    }

    /// `--uidmap`/`--gidmap` were `given`: refuse them unless real root (see
    /// [`Identity::check_explicit_maps`]), before anything else.
    pub fn explicit_maps(mut self, given: bool, why: &'static str) -> Self {
        self.explicit_maps = given.then_some(why);
        self
    }

    /// Warn on stderr when the user has no subordinate ids (files will be the user's own, and
    /// image owners recorded in `user.rootlesscontainers`).
    pub fn warn_without_subids(mut self, warn: bool) -> Self {
        self.warn_single = warn;
        self
    }

    /// Change the id maps before the namespace is made (ovl-diff moves `nobody` aside).
    pub fn adjust_maps(mut self, f: fn(&mut RootlessMaps)) -> Self {
        self.adjust = Some(f);
        self
    }

    /// The plan for the new namespace (what [`Reexec::root_or_exit`] would use).
    pub fn plan(&self) -> std::io::Result<UsernsPlan> {
        let mut plan = UsernsPlan::for_current_user(false)?;
        if let Some(f) = self.adjust {
            f(&mut plan.maps);
        }
        Ok(plan)
    }

    /// The identity to work as when this process is real root or root of a user namespace.
    /// Otherwise run this program again with the same arguments as root of a new user
    /// namespace, and exit with its status: then this call does not return.
    pub fn root_or_exit(self) -> Identity {
        let identity = Identity::current();
        let tool = self.tool;
        let fail = |msg: String| -> ! {
            eprintln!("{tool}: error: {msg}");
            std::process::exit(1)
        };
        if let Some(why) = self.explicit_maps {
            identity
                .check_explicit_maps(tool, true, why)
                .unwrap_or_else(|m| fail(m));
        }
        if !identity.needs_reexec() {
            return identity;
        }
        // The copy we started is root of its namespace by construction; if it is not, running
        // again would only nest namespaces without end.
        if userns::in_userns() {
            fail(format!(
                "not root in the user namespace {tool} made for itself (uid {})",
                rustix::process::geteuid().as_raw()
            ));
        }
        let plan = self.plan().unwrap_or_else(|e| {
            fail(format!("reading /etc/subuid and /etc/subgid: {e}"));
        });
        if self.warn_single && !plan.maps.has_subordinate_ids() {
            eprintln!(
                "{tool}: warning: no subordinate ids for this user in /etc/subuid and \
                 /etc/subgid: files will belong to you and image owners and modes are \
                 recorded in xattrs (user.fuseoverlayfs.override_stat, which fuse-overlayfs \
                 presents, and umoci's user.rootlesscontainers)"
            );
        }
        match userns::reexec_self(&plan) {
            Ok(code) => std::process::exit(code),
            Err(e) => fail(crate::message::error_chain(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(uid: IdMap, gid: IdMap) -> RootlessMaps {
        RootlessMaps { uid, gid }
    }

    #[test]
    fn root_is_real_only_in_the_initial_namespace() {
        let init = maps(IdMap::identity(), IdMap::identity());
        assert_eq!(Identity::of(0, init.clone()), Identity::RealRoot);
        assert_eq!(Identity::of(1000, init), Identity::User);
        assert!(
            Identity::RealRoot
                .check_explicit_maps("t", true, "x")
                .is_ok()
        );
        assert!(Identity::User.check_explicit_maps("t", false, "x").is_ok());
        let e = Identity::User
            .check_explicit_maps("t", true, "x")
            .unwrap_err();
        assert!(
            e.starts_with("--uidmap/--gidmap need real root (x)") && e.contains(", t maps"),
            "{e}"
        );
        // `unshare -r`: euid 0, only the user's own id mapped.
        let unshare = maps(IdMap::single(1000), IdMap::single(1000));
        let id = Identity::of(0, unshare.clone());
        assert!(matches!(id, Identity::NamespaceRoot(_)));
        assert_eq!(id.xattr_ns(), XattrNs::User);
        assert_eq!(id.owner_policy(), OwnerPolicy::Record);
        assert_eq!(Identity::of(5, unshare), Identity::User);
    }

    #[test]
    fn a_namespace_with_subordinate_ids_preserves_owners() {
        let subs = crate::idmap::parse_subordinate("u:100000:65536\n", "u", 1000);
        let m = crate::idmap::rootless_map(1000, &subs);
        let id = Identity::of(0, maps(m.clone(), m));
        assert_eq!(id.owner_policy(), OwnerPolicy::Preserve);
        assert_eq!(id.xattr_ns(), XattrNs::User);
        assert!(!id.is_real_root() && !id.needs_reexec());
        assert_eq!(Identity::RealRoot.xattr_ns(), XattrNs::Trusted);
        assert_eq!(Identity::RealRoot.owner_policy(), OwnerPolicy::Preserve);
    }
}
