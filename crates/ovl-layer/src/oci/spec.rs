//! The JSON documents of an image layout: descriptors, image indexes, manifests, configs.
//!
//! Owns their shape. Only the fields ovl reads or changes are typed; every other field is
//! kept in `extra` and written back as it came, so an image ovl appends to loses nothing.
//! Documents are written by [`to_json`]: keys sorted, no whitespace, so the same content
//! always gives the same bytes and the same digest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Digest;

/// The annotation that names an image in `index.json` (its tag).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The content of the `oci-layout` file.
pub(crate) const LAYOUT_FILE: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

fn two() -> u32 {
    2
}

/// A pointer to a blob: what it is, its digest and its exact size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(
        rename = "mediaType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
            extra: Map::new(),
        }
    }

    /// An image index (OCI) or manifest list (Docker): a list of images, not an image.
    pub fn is_index(&self) -> bool {
        self.media_type.contains("index") || self.media_type.contains("manifest.list")
    }

    /// The tag the descriptor carries in `index.json`.
    pub fn tag(&self) -> Option<&str> {
        self.annotations.get(REF_NAME).map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `index.json`, or a nested image index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Index {
    #[serde(rename = "schemaVersion", default = "two")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for Index {
    fn default() -> Index {
        Index {
            schema_version: 2,
            media_type: None,
            manifests: Vec::new(),
            extra: Map::new(),
        }
    }
}

impl Index {
    /// Every tag, escaped for printing.
    pub fn tags(&self) -> String {
        let tags: Vec<String> = self
            .manifests
            .iter()
            .filter_map(|m| m.tag().map(|t| format!("{t:?}")))
            .collect();
        if tags.is_empty() {
            "none".into()
        } else {
            tags.join(", ")
        }
    }

    /// Which entry `tag` names, or with no tag the only entry. `None` when there is no such tag
    /// (or no entry at all); several entries and no tag is an error.
    pub fn find(&self, tag: Option<&str>) -> Result<Option<usize>, super::OciError> {
        match tag {
            Some(t) => Ok(self.manifests.iter().position(|m| m.tag() == Some(t))),
            None => match self.manifests.len() {
                0 => Ok(None),
                1 => Ok(Some(0)),
                _ => Err(super::OciError::Ambiguous { tags: self.tags() }),
            },
        }
    }

    /// The entry `tag` names, or with no tag the only entry: it must exist.
    pub fn image(&self, tag: Option<&str>) -> Result<&Descriptor, super::OciError> {
        match self.find(tag)? {
            Some(i) => Ok(&self.manifests[i]),
            None => Err(match tag {
                Some(t) => super::OciError::NoTag {
                    tag: t.to_string(),
                    tags: self.tags(),
                },
                None => super::OciError::NoImage,
            }),
        }
    }

    /// The entry for `os`/`arch`, or the only entry.
    pub fn for_platform(&self, os: &str, arch: &str) -> Option<&Descriptor> {
        self.manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == os && p.architecture == arch)
            })
            .or(match self.manifests.as_slice() {
                [one] => Some(one),
                _ => None,
            })
    }
}

/// An image manifest: the config and the layers, bottom first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion", default = "two")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Manifest {
    pub fn new(config: Descriptor) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_TYPE.into()),
            config,
            layers: Vec::new(),
            extra: Map::new(),
        }
    }
}

/// An image config: what ovl changes in it is `rootfs.diff_ids`, `history` and `created`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The runtime defaults (Env, Cmd, ...), which ovl does not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
    pub rootfs: RootFs,
    #[serde(default)]
    pub history: Vec<History>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ImageConfig {
    /// The config of an image with no layers yet, for this machine's architecture.
    pub fn empty() -> ImageConfig {
        ImageConfig {
            architecture: super::host_arch().into(),
            os: "linux".into(),
            created: None,
            config: Some(Value::Object(Map::new())),
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: Vec::new(),
                extra: Map::new(),
            },
            history: Vec::new(),
            extra: Map::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A document as ovl writes it: keys sorted (serde_json's map is ordered by key), compact.
pub fn to_json<T: Serialize>(doc: &T) -> Vec<u8> {
    let value = serde_json::to_value(doc).expect("OCI documents serialise");
    serde_json::to_vec(&value).expect("a JSON value serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_and_keys_are_sorted() {
        let text = r#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","size":3,"urls":["x"],"annotations":{"org.opencontainers.image.ref.name":"v1"},"platform":{"os":"linux","architecture":"amd64","variant":"v3"}}],"annotations":{"a":"b"}}"#;
        let index: Index = serde_json::from_str(text).unwrap();
        assert_eq!(index.find(Some("v1")).unwrap(), Some(0));
        assert_eq!(index.find(Some("v2")).unwrap(), None);
        assert_eq!(index.find(None).unwrap(), Some(0));
        assert!(index.for_platform("linux", "amd64").is_some());
        let out = String::from_utf8(to_json(&index)).unwrap();
        let again: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(again, serde_json::from_str::<Value>(text).unwrap());
        assert!(out.starts_with(r#"{"annotations":{"a":"b"},"manifests":[{"annotations""#));
        assert!(out.contains(r#""urls":["x"]"#) && out.contains(r#""variant":"v3""#));
        // A digest that is not one fails the whole document, naming it.
        let bad = text.replace(
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:/etc/hostname",
        );
        let e = serde_json::from_str::<Index>(&bad).unwrap_err().to_string();
        assert!(
            e.contains("/etc/hostname") && e.contains("not a digest"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_config_is_what_ovl_diff_always_wrote() {
        assert_eq!(
            String::from_utf8(to_json(&ImageConfig::empty())).unwrap(),
            format!(
                r#"{{"architecture":"{}","config":{{}},"history":[],"os":"linux","rootfs":{{"diff_ids":[],"type":"layers"}}}}"#,
                super::super::host_arch()
            )
        );
        assert_eq!(
            to_json(&Index::default()),
            br#"{"manifests":[],"schemaVersion":2}"#
        );
    }
}
