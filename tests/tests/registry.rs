//! Layers leave the machine through a registry: `ovl-diff --oci-layout` output pushed with
//! skopeo to a real registry (Debian's docker-registry on loopback) and pulled back, with the
//! layer's diffID intact.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ovl_tests::{bin, is_root, require, run_ok, which};

/// A registry on 127.0.0.1, stopped when dropped.
struct Registry {
    child: Child,
    port: u16,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        // Ask the kernel for a free port, then hand it to the registry.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the registry did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { child, port }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// The value of `"key": "..."` in a JSON text (enough for digests).
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    let at = text
        .find(&format!("\"{key}\""))
        .unwrap_or_else(|| panic!("no {key} in {text}"));
    let rest = &text[at..];
    let start = rest.find("sha256:").unwrap();
    &rest[start..start + 71]
}

#[test]
fn a_diffed_layer_goes_through_a_registry_and_keeps_its_diff_id() {
    if !require("skopeo (package skopeo)", which("skopeo").is_some())
        || !require(
            "docker-registry (package docker-registry)",
            which("docker-registry").is_some(),
        )
        || !require("root (to make a 0/0 whiteout in the upper)", is_root())
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("etc/hello"), b"hello from ovl\n").unwrap();
    run_ok(
        Command::new("mknod")
            .arg(upper.join("etc/motd"))
            .args(["c", "0", "0"]),
    );
    let layout = t.path().join("image");
    let desc = t.path().join("layer.json");
    run_ok(
        Command::new(bin("ovl-diff"))
            .args(["--quiet", "--compress", "gzip", "--json"])
            .arg(&desc)
            .arg("--oci-layout")
            .arg(format!("{}:v1", layout.display()))
            .arg(&upper),
    );
    let diff_id = field(&json(&desc), "diffID").to_string();

    let registry = Registry::start(t.path());
    let remote = format!("docker://127.0.0.1:{}/ovl/test:v1", registry.port);
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(&remote),
    );
    let back = t.path().join("back");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(&remote)
            .arg(format!("oci:{}:v1", back.display())),
    );
    drop(registry);

    // The pulled image's config names our diffID, and its layer blob decompresses to exactly
    // the tar whose sha256 that is.
    let index = json(&back.join("index.json"));
    let manifest = json(
        &back
            .join("blobs/sha256")
            .join(&field(&index, "digest")[7..]),
    );
    let config = json(
        &back
            .join("blobs/sha256")
            .join(&field(&manifest, "config")[7..]),
    );
    assert!(
        config.contains(&diff_id),
        "diffID {diff_id} not in the pulled config: {config}"
    );
    let layer_digest =
        field(&manifest[manifest.find("\"layers\"").unwrap()..], "digest").to_string();
    let blob = std::fs::read(back.join("blobs/sha256").join(&layer_digest[7..])).unwrap();
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(&blob[..])
        .read_to_end(&mut tar)
        .unwrap();
    use sha2::Digest;
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar))),
        diff_id
    );
    let names: Vec<String> = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
        .collect();
    assert!(
        names.contains(&"etc/.wh.motd".to_string()) && names.contains(&"etc/hello".to_string()),
        "{names:?}"
    );
}
