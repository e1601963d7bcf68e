//! The rule for every error type in the workspace: a variant whose field is its `#[source]`
//! (or `#[from]`, or a field named `source`) does not print that field in its `#[error]` text,
//! since whoever prints the error prints its sources after it (anyhow's `{:#}`): printed in
//! both places, every cause was said twice or three times.

use std::path::Path;

/// `(file, variant text)` for every `#[error("...")]` in the crates' sources.
fn error_variants() -> Vec<(String, String)> {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(&crates) {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") || !path.to_string_lossy().contains("/src/") {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let starts: Vec<usize> = text.match_indices("#[error(").map(|(i, _)| i).collect();
        for (n, &start) in starts.iter().enumerate() {
            // A variant ends at the next `#[error(` or at the end of its enum (a `}` at the
            // start of a line).
            let limit = starts.get(n + 1).copied().unwrap_or(text.len());
            let end = text[start..limit].find("\n}").map_or(limit, |i| start + i);
            out.push((path.display().to_string(), text[start..end].to_string()));
        }
    }
    out
}

/// The fields of a variant that are its source.
fn source_fields(variant: &str) -> Vec<String> {
    let body = &variant[variant.find(")]").map_or(0, |i| i + 2)..];
    let mut fields = Vec::new();
    if let Some(open) = body.find(['(', '{']) {
        let named = body.as_bytes()[open] == b'{';
        let inner = &body[open + 1..];
        let mut marked = false;
        for (i, part) in inner.split(',').enumerate() {
            let part = part.trim();
            let is_marked = marked || part.contains("#[source]") || part.contains("#[from]");
            marked = false;
            if named {
                let name = part
                    .rsplit("]")
                    .next()
                    .unwrap_or("")
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                if part.ends_with("#[source]") {
                    marked = true;
                    continue;
                }
                if is_marked || name == "source" {
                    fields.push(name);
                }
            } else if is_marked {
                fields.push(i.to_string());
            }
        }
    }
    fields
}

#[test]
fn no_error_prints_its_own_source() {
    let variants = error_variants();
    assert!(
        variants.len() > 40,
        "found only {} error variants",
        variants.len()
    );
    let mut offenders = Vec::new();
    for (file, variant) in &variants {
        if variant.starts_with("#[error(transparent)]") {
            continue;
        }
        let message = &variant[..variant.find(")]").unwrap_or(variant.len())];
        for field in source_fields(variant) {
            if message.contains(&format!("{{{field}}}")) || message.contains(&format!("{{{field}:"))
            {
                offenders.push(format!("{file}: {{{field}}} in {}", message.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "errors that print their source:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_scan_sees_sources() {
    // The checker itself: it must find each kind of source field.
    let v = "#[error(\"{path}: {source}\")]\n    Io {\n        path: PathBuf,\n        source: std::io::Error,\n    },";
    assert_eq!(source_fields(v), ["source"]);
    let v = "#[error(\"reading: {0}\")]\n    Read(#[source] io::Error),";
    assert_eq!(source_fields(v), ["0"]);
    let v = "#[error(\"x {err}\")]\n    E {\n        name: String,\n        #[source]\n        err: Inner,\n    },";
    assert_eq!(source_fields(v), ["err"]);
}
