//! The `ovl-diff` command line: a thin shim over [`ovl_diff::diff`].

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use ovl_cli::{Bar, CountingWriter, Unit};
use ovl_diff::{Compression, DiffOptions, LayerInfo, LayoutRef, Stats};
use ovl_layer::{IdRange, Reexec};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Compress {
    None,
    Gzip,
    Zstd,
}

/// Write the upper layer of an overlay (UPPER, the upperdir) as an OCI layer tar: whiteouts and
/// opaque directories in OCI form, exact metadata, container ids, reproducible bytes.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The upperdir.
    upper: PathBuf,
    /// The lowerdirs the upper was mounted on, top first, colon-separated as in `lowerdir=`
    /// (`\:` for a colon in a name, `\\` for a backslash); repeat the option to add more.
    /// Needed for uppers written with redirect_dir=on or metacopy=on.
    #[arg(long, value_name = "DIR[:DIR...]")]
    lower: Vec<OsString>,
    /// Compression of the layer.
    #[arg(long, value_enum, default_value = "none")]
    compress: Compress,
    /// Write the layer to FILE (through a temporary sibling, renamed when complete) instead of
    /// stdout.
    #[arg(short, long, value_name = "FILE", conflicts_with = "oci_layout")]
    output: Option<PathBuf>,
    /// Print the layer's OCI descriptor (mediaType, digest, size) and its diffID as JSON: to
    /// FILE, else to stdout when the layer goes to a file (-o, --oci-layout), else to stderr.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
    /// Append the layer to the image TAG (or the only image) of an OCI image layout, making a
    /// new config and manifest; the layout is created if DIR does not exist.
    #[arg(long, value_name = "DIR[:TAG]")]
    oci_layout: Option<OsString>,
    /// Compression level: gzip 1-12 (libdeflate's levels, default 4, which compresses as
    /// `gzip -6` does; 10-12 are slower and smaller still), zstd 1-19 (default 3). `-1` ...
    /// `-9` are short for `--level 1` ... `--level 9`, as in gzip.
    #[arg(long, value_name = "N")]
    level: Option<u32>,
    /// Compression threads (default: every core; the output is the same for any count).
    #[arg(long)]
    threads: Option<usize>,
    /// No summary line.
    #[arg(short, long)]
    quiet: bool,
    /// The uid map the upper was written under (`ovl-mount --uidmap`, `ovl-import --uidmap`):
    /// its host ids are exported as the container ids of the map, and a host id outside the map
    /// is an error naming the path. Repeatable; alone, it maps gids too. Real root only.
    #[arg(long, value_name = "CONTAINER:HOST:COUNT")]
    uidmap: Vec<IdRange>,
    /// The gid map the upper was written under, as --uidmap.
    #[arg(long, value_name = "CONTAINER:HOST:COUNT")]
    gidmap: Vec<IdRange>,
}

fn main() {
    let cli: Cli = ovl_cli::parse_from(level_shorthands(std::env::args_os()));
    let given = !cli.uidmap.is_empty() || !cli.gidmap.is_empty();
    // Run by the unprivileged owner of a rootless upper: read it as container root in a user
    // namespace mapped to our subordinate ids, so host ids read back as container ids and
    // every file is readable.
    Reexec::new("ovl-diff")
        .explicit_maps(given, "the upper holds host ids of the map")
        .adjust_maps(ovl_diff::alias_overflow_of_this_host)
        .root_or_exit();
    if let Err(e) = run(cli) {
        eprintln!("ovl-diff: error: {e:#}");
        std::process::exit(1);
    }
}

/// gzip's `-1` ... `-9` as `--level N` (clap takes no digits for short options). Not after
/// `--`, where they would be names.
fn level_shorthands(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut end_of_options = false;
    args.map(|a| {
        if a == "--" {
            end_of_options = true;
        }
        match a.as_encoded_bytes() {
            [b'-', d @ b'1'..=b'9'] if !end_of_options => {
                OsString::from(format!("--level={}", *d as char))
            }
            _ => a,
        }
    })
    .collect()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut opts = DiffOptions::new(cli.upper.clone());
    if !cli.lower.is_empty() {
        opts.lowers = ovl_layer::parse_lower_args(&cli.lower).context("--lower")?;
    }
    opts.compression = match cli.compress {
        Compress::None => Compression::None,
        Compress::Gzip => Compression::Gzip,
        Compress::Zstd => Compression::Zstd,
    };
    opts.tar = ovl_layer::TarOptions::from_env().map_err(anyhow::Error::msg)?;
    // Digests cost a core's worth of sha256: skip them when nothing will show them.
    opts.tar.skip_digest = cli.quiet && cli.json.is_none() && cli.oci_layout.is_none();
    if let Some(t) = cli.threads {
        opts.threads = t.max(1);
    }
    if let Some(level) = cli.level {
        match opts.compression.levels() {
            None => bail!("--level needs --compress gzip or zstd"),
            Some(r) if !r.contains(&level) => bail!(
                "--level {level}: {} takes {} to {}",
                cli_compress_name(opts.compression),
                r.start(),
                r.end()
            ),
            Some(_) => opts.level = Some(level),
        }
    }
    opts.ids = ovl_layer::shift_maps(&cli.uidmap, &cli.gidmap)?;
    opts.refuse_ids = ovl_diff::unmapped_id_markers();
    opts.id_alias = ovl_diff::id_alias_in_this_namespace();
    let upper = cli.upper.display().to_string();
    let what = || format!("exporting the upper {upper}");
    let layer_on_stdout = cli.oci_layout.is_none() && cli.output.is_none();

    let (info, stats, dest) = if let Some(layout) = &cli.oci_layout {
        let layout = LayoutRef::parse(layout);
        let mut blob = ovl_diff::begin_oci_append(&layout)
            .with_context(|| format!("opening the OCI layout {}", layout.dir.display()))?;
        let file = blob
            .file()
            .try_clone()
            .context("duplicating a file handle")?;
        let (info, stats) = diff_showing_progress(&opts, file, cli.quiet).with_context(what)?;
        // No host paths in the image's history: it leaves the machine.
        let created_by = format!(
            "ovl-diff --compress {}{}",
            cli_compress_name(opts.compression),
            opts.level
                .map(|l| format!(" --level {l}"))
                .unwrap_or_default()
        );
        let appended =
            ovl_diff::finish_oci_append(&layout, blob, &info, &created_by, opts.tar.clamp_mtime)
                .with_context(|| format!("updating the OCI layout {}", layout.dir.display()))?;
        let tag = layout.tag.as_deref().unwrap_or("(untagged)");
        (
            info,
            stats,
            format!(
                "{}:{tag} ({} layers, manifest {})",
                layout.dir.display(),
                appended.layers,
                appended.manifest_digest
            ),
        )
    } else if let Some(path) = &cli.output {
        let mut f = ovl_diff::AtomicFile::create(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let file = f.file().try_clone().context("duplicating a file handle")?;
        let (info, stats) = diff_showing_progress(&opts, file, cli.quiet).with_context(what)?;
        f.commit()
            .with_context(|| format!("writing {}", path.display()))?;
        (info, stats, path.display().to_string())
    } else {
        if std::io::stdout().is_terminal() {
            bail!(
                "refusing to write a layer to a terminal: redirect stdout (ovl-diff UPPER > layer.tar) or use -o FILE"
            );
        }
        let fd = rustix::io::dup(std::io::stdout()).context("duplicating stdout")?;
        let (info, stats) =
            diff_showing_progress(&opts, std::fs::File::from(fd), cli.quiet).with_context(what)?;
        (info, stats, "stdout".to_string())
    };

    if let Some(j) = &cli.json {
        let text = serde_json::to_string_pretty(&info.descriptor_json())? + "\n";
        if j.as_os_str() == "-" && layer_on_stdout {
            eprint!("{text}");
        } else if j.as_os_str() == "-" {
            // The layer went to a file: stdout is free, where `jq` reads it.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("writing the JSON descriptor to stdout")?;
        } else {
            std::fs::write(j, text).with_context(|| format!("writing {}", j.display()))?;
        }
    }
    if !cli.quiet {
        eprintln!("{}", summary(&info, &stats, &dest));
    }
    Ok(())
}

/// [`ovl_diff::diff`] with a bar of the layer bytes written, on a terminal.
fn diff_showing_progress(
    opts: &DiffOptions,
    file: std::fs::File,
    quiet: bool,
) -> Result<(LayerInfo, Stats), ovl_diff::DiffError> {
    if !ovl_cli::progress_wanted(quiet) {
        return ovl_diff::diff_to_file(opts, file).map(|(_, info, stats)| (info, stats));
    }
    let (out, count) = CountingWriter::new(file);
    let bar = Bar::start("diff", Unit::Bytes, quiet, move || {
        (count.load(std::sync::atomic::Ordering::Relaxed), None)
    });
    let result = ovl_diff::diff(opts, out);
    bar.finish();
    result.map(|(_, info, stats)| (info, stats))
}

fn summary(info: &LayerInfo, s: &Stats, dest: &str) -> String {
    let mut extra = Vec::new();
    if s.redirects > 0 {
        extra.push(format!("{} renamed dirs", s.redirects));
    }
    if s.from_lowers > 0 {
        extra.push(format!("{} files read from the lowers", s.from_lowers));
    }
    if s.skipped_sockets > 0 {
        extra.push(format!(
            "{} sockets skipped (tar cannot hold them)",
            s.skipped_sockets
        ));
    }
    format!(
        "ovl-diff: {} entries ({} files, {:.1} MiB, {} hardlinks, {} sparse), {} whiteouts, {} opaque dirs{} -> {} ({}, {} bytes, diffID {})",
        s.entries,
        s.files,
        s.bytes as f64 / (1024.0 * 1024.0),
        s.hardlinks,
        s.sparse,
        s.whiteouts,
        s.opaque_dirs,
        if extra.is_empty() {
            String::new()
        } else {
            format!(", {}", extra.join(", "))
        },
        dest,
        info.digest_str(),
        info.size,
        info.diff_id_str(),
    )
}

fn cli_compress_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
    }
}
