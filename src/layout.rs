//! Carrying images across an air gap as standard OCI image layouts (what `skopeo copy oci:`,
//! `oras --from-oci-layout` and Docker 25+'s `docker save` read and write).
//!
//! `regcache export` writes cached images, with their signatures, attestations, SBOMs and
//! referrers, to a layout directory or tar; `index.json` names every image in full
//! (`org.opencontainers.image.ref.name` = `docker.io/library/alpine:3.20`, as
//! `io.containerd.image.name` too) and marks each referrers list with the subject it
//! belongs to. `regcache import` reads such a layout (directory or tar), verifies every
//! blob it needs into a staging directory of its own before anything is committed, then
//! commits content, tags (under the upstream names they came from) and which repositories
//! hold what. It takes no lock: commits are renames of verified, content-addressed files,
//! and a running server picks them up at its next lookup.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::cache::blob_store::{path_in, Kind};
use crate::cache::tags::{TagKey, TagRecord, TagStore};
use crate::digest::{Digest, Verifier};
use crate::oci;
use crate::prefetch::{parse_image, ImageRef};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// On an index.json entry: the referrers list (an image index) of `<upstream>/<repo>@<digest>`.
const REFERRERS_OF: &str = "dev.regcache.referrers-of";

/// What one content-addressed file of the layout is, and where its bytes are.
enum Source {
    /// A manifest's bytes (the cache stores them behind a media-type line).
    Manifest {
        media_type: String,
        bytes: Vec<u8>,
    },
    Blob(PathBuf, u64),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Manifest { bytes, .. } => bytes.len() as u64,
            Source::Blob(_, size) => *size,
        }
    }
}

#[derive(Debug, Default)]
pub struct Exported {
    pub entries: usize,
    pub files: usize,
    pub bytes: u64,
}

/// A cached manifest: (media type, bytes).
pub(crate) fn cached_manifest(root: &Path, digest: &Digest) -> Option<(String, Vec<u8>)> {
    let raw = fs::read(path_in(root, Kind::Manifest, digest)).ok()?;
    let nl = raw.iter().position(|&b| b == b'\n')?;
    let media_type = String::from_utf8(raw[..nl].to_vec()).ok()?;
    Some((media_type, raw[nl + 1..].to_vec()))
}

/// The digests a manifest references: (child manifests, blobs with their sizes).
pub(crate) fn references(bytes: &[u8]) -> (Vec<String>, Vec<(String, u64)>) {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return (Vec::new(), Vec::new());
    };
    let digest_of = |d: &serde_json::Value| d.get("digest").and_then(|x| x.as_str()).map(str::to_owned);
    let children = doc
        .get("manifests")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(digest_of)
        .collect();
    let mut blobs = Vec::new();
    let config = doc.get("config").into_iter();
    let layers = ["layers", "blobs"]
        .into_iter()
        .flat_map(|k| doc.get(k).and_then(|l| l.as_array()).into_iter().flatten());
    for d in config.chain(layers) {
        if let (Some(digest), Some(size)) = (digest_of(d), d.get("size").and_then(|s| s.as_u64())) {
            blobs.push((digest, size));
        }
    }
    (children, blobs)
}

struct Exporter<'a> {
    root: &'a Path,
    tags: TagStore,
    files: BTreeMap<String, Source>,
    entries: Vec<serde_json::Value>,
}

impl Exporter<'_> {
    /// Adds a cached manifest and everything under it that is cached (an index's absent
    /// platforms are left out; an image's absent blob is an error). Returns the manifest
    /// digests taken.
    fn take(&mut self, image: &str, digest: &str) -> Result<Vec<String>, String> {
        let mut taken = Vec::new();
        let mut stack = vec![digest.to_owned()];
        while let Some(d) = stack.pop() {
            if self.files.contains_key(&d) {
                continue;
            }
            let parsed: Digest = d.parse().map_err(|_| format!("{image}: invalid digest {d}"))?;
            let Some((media_type, bytes)) = cached_manifest(self.root, &parsed) else {
                if d == digest {
                    return Err(format!("{image}: manifest {d} is not cached (prefetch it first)"));
                }
                continue; // a platform that was not prefetched
            };
            let (children, blobs) = references(&bytes);
            for (blob, size) in blobs {
                let b: Digest = blob.parse().map_err(|_| format!("{image}: invalid digest {blob}"))?;
                let path = path_in(self.root, Kind::Blob, &b);
                match fs::metadata(&path) {
                    Ok(m) if m.len() == size => {
                        self.files.insert(blob, Source::Blob(path, size));
                    }
                    _ => return Err(format!("{image}: blob {blob} of {d} is not cached (prefetch it first)")),
                }
            }
            stack.extend(children);
            self.files.insert(d.clone(), Source::Manifest { media_type, bytes });
            taken.push(d);
        }
        Ok(taken)
    }

    fn entry(&mut self, digest: &str, annotations: serde_json::Value) {
        if let Some(Source::Manifest { media_type, bytes }) = self.files.get(digest) {
            self.entries.push(serde_json::json!({
                "mediaType": media_type,
                "digest": digest,
                "size": bytes.len(),
                "annotations": annotations,
            }));
        }
    }

    fn tag(&self, image: &ImageRef, tag: &str) -> Option<Digest> {
        // A tag is recorded once per Accept set; the widest set is the index itself.
        (1..=oci::AcceptSet::ALL.bits()).rev().find_map(|accept| {
            let key = TagKey {
                upstream: image.registry.clone(),
                repo: image.repo.clone(),
                tag: tag.to_owned(),
                accept,
            };
            self.tags.get(&key)?.digest()
        })
    }

    fn image(&mut self, image: &ImageRef) -> Result<(), String> {
        let digest = match image.reference.parse::<Digest>() {
            Ok(d) => d,
            Err(_) => self
                .tag(image, &image.reference)
                .ok_or_else(|| format!("{image}: not cached (prefetch it first)"))?,
        };
        let name = image.to_string();
        let taken = self.take(&name, &digest.to_string())?;
        self.entry(
            &digest.to_string(),
            serde_json::json!({ REF_NAME: name, CONTAINERD_NAME: name }),
        );
        // What is attached to any of its manifests: cosign's tags and referrers lists.
        for d in taken {
            let Some(hex) = d.strip_prefix("sha256:") else { continue };
            for suffix in ["sig", "att", "sbom"] {
                let tag = format!("sha256-{hex}.{suffix}");
                if let Some(attached) = self.tag(image, &tag) {
                    let attached = attached.to_string();
                    if self.take(&name, &attached).is_ok() {
                        let full = format!("{}/{}:{tag}", image.registry, image.repo);
                        self.entry(&attached, serde_json::json!({ REF_NAME: full, CONTAINERD_NAME: full }));
                    }
                }
            }
            let key = TagKey {
                upstream: image.registry.clone(),
                repo: image.repo.clone(),
                tag: format!("referrers/{d}"),
                accept: 0,
            };
            if let Some(list) = self.tags.get(&key).and_then(|r| r.digest()) {
                let list = list.to_string();
                if self.take(&name, &list).is_ok() {
                    let subject = format!("{}/{}@{d}", image.registry, image.repo);
                    self.entry(&list, serde_json::json!({ REFERRERS_OF: subject }));
                }
            }
        }
        Ok(())
    }
}

fn index_json(entries: &[serde_json::Value]) -> Vec<u8> {
    serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "manifests": entries,
    }))
    .unwrap_or_default()
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Whether `out` names an archive (`.tar` or `.tar.zst`) rather than a directory.
fn is_archive(out: &Path) -> bool {
    let name = out.to_string_lossy();
    name.ends_with(".tar") || name.ends_with(".tar.zst")
}

/// Exports `images` from the cache under `cache_dir` to `out`: a tar when it ends in `.tar`,
/// a zstd-compressed tar for `.tar.zst`, else a directory (created; it must not hold a
/// layout already). With `split`, an archive is written as parts of at most that many
/// bytes (`OUT.000`, `OUT.001`, …) and `OUT.sha256` listing each part's digest.
pub fn export(cache_dir: &Path, images: &[ImageRef], out: &Path, split: Option<u64>) -> Result<Exported, String> {
    let root = cache_dir.join("v1");
    if !root.is_dir() {
        return Err(format!("{} holds no regcache cache", cache_dir.display()));
    }
    let mut exporter = Exporter {
        root: &root,
        tags: TagStore::new(&root),
        files: BTreeMap::new(),
        entries: Vec::new(),
    };
    for image in images {
        exporter.image(image)?;
    }
    let report = Exported {
        entries: exporter.entries.len(),
        files: exporter.files.len(),
        bytes: exporter.files.values().map(Source::size).sum(),
    };
    let index = index_json(&exporter.entries);
    if split.is_some() && !is_archive(out) {
        return Err("--split needs an archive (-o FILE.tar or FILE.tar.zst)".into());
    }
    let written = if is_archive(out) {
        write_tar(out, &exporter.files, &index, split)
    } else {
        write_dir(out, &exporter.files, &index)
    };
    written.map_err(|e| format!("writing {}: {e}", out.display()))?;
    Ok(report)
}

fn blob_name(digest: &str) -> String {
    let (algo, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    format!("blobs/{algo}/{hex}")
}

fn write_dir(out: &Path, files: &BTreeMap<String, Source>, index: &[u8]) -> io::Result<()> {
    if out.join("index.json").exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "it already holds a layout",
        ));
    }
    for (digest, source) in files {
        let path = out.join(blob_name(digest));
        fs::create_dir_all(path.parent().unwrap_or(out))?;
        match source {
            Source::Manifest { bytes, .. } => fs::write(&path, bytes)?,
            Source::Blob(from, _) => {
                fs::copy(from, &path)?;
            }
        }
    }
    fs::write(out.join("oci-layout"), OCI_LAYOUT)?;
    fs::write(out.join("index.json"), index)
}

/// Where an archive's bytes go: one file, or parts of at most `limit` bytes, each hashed.
struct Parts {
    base: PathBuf,
    limit: Option<u64>,
    current: Option<(io::BufWriter<fs::File>, Verifier, u64)>,
    done: Vec<(PathBuf, Digest)>,
}

impl Parts {
    fn part_path(&self, n: usize) -> PathBuf {
        match self.limit {
            Some(_) => PathBuf::from(format!("{}.{n:03}", self.base.display())),
            None => PathBuf::from(format!("{}.partial", self.base.display())),
        }
    }

    fn roll(&mut self) -> io::Result<()> {
        if let Some((w, verifier, _)) = self.current.take() {
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            let path = self.part_path(self.done.len());
            self.done.push((path, verifier.finish()));
        }
        Ok(())
    }

    /// Ends the last part: a single archive is renamed into place, parts get their list.
    fn finish(mut self) -> io::Result<()> {
        self.roll()?;
        match self.limit {
            None => {
                let (path, _) = self.done.first().ok_or_else(|| io::Error::other("nothing written"))?;
                fs::rename(path, &self.base)
            }
            Some(_) => {
                let mut list = String::new();
                for (path, digest) in &self.done {
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    list.push_str(&format!("{}  {name}\n", digest.hex()));
                }
                fs::write(PathBuf::from(format!("{}.sha256", self.base.display())), list)
            }
        }
    }
}

impl Write for Parts {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self
            .current
            .as_ref()
            .is_some_and(|(_, _, n)| self.limit.is_some_and(|l| *n >= l))
        {
            self.roll()?;
        }
        if self.current.is_none() {
            let file = fs::File::create(self.part_path(self.done.len()))?;
            let verifier = Verifier::new(crate::digest::Algorithm::Sha256);
            self.current = Some((io::BufWriter::with_capacity(1 << 20, file), verifier, 0));
        }
        let Some((w, verifier, n)) = self.current.as_mut() else {
            return Err(io::Error::other("no part open"));
        };
        let room = self
            .limit
            .map_or(buf.len(), |l| (l - *n).min(buf.len() as u64) as usize);
        let written = w.write(&buf[..room])?;
        verifier.update(&buf[..written]);
        *n += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.current.as_mut() {
            Some((w, _, _)) => w.flush(),
            None => Ok(()),
        }
    }
}

fn write_tar(out: &Path, files: &BTreeMap<String, Source>, index: &[u8], split: Option<u64>) -> io::Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    let parts = Parts {
        base: out.to_path_buf(),
        limit: split.map(|s| s.max(1)),
        current: None,
        done: Vec::new(),
    };
    if out.to_string_lossy().ends_with(".zst") {
        let mut encoder = zstd::stream::Encoder::new(parts, 3)?;
        write_entries(&mut encoder, files, index)?;
        encoder.finish()?.finish()
    } else {
        let mut parts = parts;
        write_entries(&mut parts, files, index)?;
        parts.finish()
    }
}

fn write_entries(out: &mut dyn Write, files: &BTreeMap<String, Source>, index: &[u8]) -> io::Result<()> {
    let mut tar = tar::Builder::new(out);
    let header = |size: u64, dir: bool| {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_mtime(0);
        h.set_entry_type(if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_cksum();
        h
    };
    tar.append_data(&mut header(OCI_LAYOUT.len() as u64, false), "oci-layout", OCI_LAYOUT)?;
    tar.append_data(&mut header(index.len() as u64, false), "index.json", index)?;
    let algos: BTreeSet<&str> = files.keys().filter_map(|d| d.split_once(':').map(|(a, _)| a)).collect();
    tar.append_data(&mut header(0, true), "blobs/", io::empty())?;
    for algo in algos {
        tar.append_data(&mut header(0, true), format!("blobs/{algo}/"), io::empty())?;
    }
    for (digest, source) in files {
        let name = blob_name(digest);
        match source {
            Source::Manifest { bytes, .. } => {
                tar.append_data(&mut header(bytes.len() as u64, false), &name, &bytes[..])?
            }
            Source::Blob(from, size) => {
                tar.append_data(&mut header(*size, false), &name, fs::File::open(from)?)?;
            }
        }
    }
    tar.finish()
}

/// An archive's bytes: one file, or a split set checked part by part against its
/// `.sha256` list first (a damaged part is named), then read as one stream; decompressed
/// when it is a `.tar.zst`.
fn open_archive(input: &Path) -> Result<Box<dyn Read>, String> {
    let name = input.to_string_lossy().into_owned();
    let base = name
        .strip_suffix(".sha256")
        .or_else(|| name.strip_suffix(".000"))
        .unwrap_or(&name)
        .to_owned();
    let list = PathBuf::from(format!("{base}.sha256"));
    let reader: Box<dyn Read> = if !Path::new(&base).is_file() && list.is_file() {
        let text = fs::read_to_string(&list).map_err(|e| format!("{}: {e}", list.display()))?;
        let dir = list.parent().unwrap_or(Path::new("."));
        let mut parts = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (hex, part) = line
                .split_once("  ")
                .ok_or_else(|| format!("{}: not a list of parts: {line:?}", list.display()))?;
            let expected: Digest = format!("sha256:{hex}")
                .parse()
                .map_err(|_| format!("{}: bad digest in {line:?}", list.display()))?;
            let path = dir.join(part);
            let mut file = fs::File::open(&path).map_err(|e| format!("part {}: {e}", path.display()))?;
            let mut verifier = Verifier::new(expected.algorithm());
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(|e| format!("part {}: {e}", path.display()))?;
                if n == 0 {
                    break;
                }
                verifier.update(&buf[..n]);
            }
            let got = verifier.finish();
            if got != expected {
                return Err(format!(
                    "part {} is damaged (its bytes hash to {got}, the list says {expected}); nothing was imported",
                    path.display()
                ));
            }
            parts.push(path);
        }
        let mut chained: Box<dyn Read> = Box::new(io::empty());
        for path in parts {
            let file = fs::File::open(&path).map_err(|e| format!("part {}: {e}", path.display()))?;
            chained = Box::new(chained.chain(file));
        }
        chained
    } else {
        Box::new(fs::File::open(input).map_err(|e| format!("{}: {e}", input.display()))?)
    };
    let reader = io::BufReader::with_capacity(1 << 20, reader);
    if base.ends_with(".zst") {
        let decoder = zstd::stream::Decoder::new(reader).map_err(|e| format!("{name}: {e}"))?;
        Ok(Box::new(decoder))
    } else {
        Ok(Box::new(reader))
    }
}

#[derive(Debug, Default)]
pub struct Imported {
    /// Named images and attachments recorded.
    pub names: usize,
    /// Files committed now, and files the cache held already.
    pub new: usize,
    pub present: usize,
    pub bytes: u64,
}

/// Copies `from` into `to` while hashing; the digest it has.
fn copy_hashing(from: &mut dyn Read, to: &Path, algorithm: crate::digest::Algorithm) -> io::Result<(Digest, u64)> {
    let mut out = fs::File::create(to)?;
    let mut verifier = Verifier::new(algorithm);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        verifier.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    crate::cache::blob_store::record_size(&out, size);
    out.sync_all()?;
    Ok((verifier.finish(), size))
}

/// A layout's content, staged and verified: digest -> staged file.
struct Staged {
    dir: PathBuf,
    files: BTreeMap<String, PathBuf>,
    index: Vec<u8>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn damaged(digest: &str, got: &Digest, input: &Path) -> String {
    format!(
        "blob {digest} in {} is damaged (its bytes hash to {got}); nothing was imported",
        input.display()
    )
}

/// Reads a tar layout: every blob is verified into the staging directory as it streams.
fn stage_tar(input: &Path, staged: &mut Staged) -> Result<(), String> {
    let mut archive = tar::Archive::new(open_archive(input)?);
    let entries = archive
        .entries()
        .map_err(|e| format!("{}: not a tar archive: {e}", input.display()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("{}: {e}", input.display()))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./");
        if path == "index.json" {
            entry
                .read_to_end(&mut staged.index)
                .map_err(|e| format!("{}: {e}", input.display()))?;
            continue;
        }
        let Some(rest) = path.strip_prefix("blobs/") else {
            continue;
        };
        let Some((algo, hex)) = rest.split_once('/') else {
            continue;
        };
        let digest = format!("{algo}:{hex}");
        let Ok(expected) = digest.parse::<Digest>() else {
            continue; // not content-addressed: not ours to take
        };
        let to = staged.dir.join(format!("{algo}-{hex}"));
        let (got, _) =
            copy_hashing(&mut entry, &to, expected.algorithm()).map_err(|e| format!("{}: {e}", input.display()))?;
        if got != expected {
            return Err(damaged(&digest, &got, input));
        }
        staged.files.insert(digest, to);
    }
    Ok(())
}

/// Reads a layout directory: the blobs `needed` are verified into the staging directory.
fn stage_dir_blob(input: &Path, digest: &str, staged: &mut Staged) -> Result<bool, String> {
    if staged.files.contains_key(digest) {
        return Ok(true);
    }
    let expected: Digest = digest.parse().map_err(|_| format!("invalid digest {digest}"))?;
    let from = input.join(blob_name(digest));
    let Ok(mut file) = fs::File::open(&from) else {
        return Ok(false);
    };
    let to = staged.dir.join(digest.replace(':', "-"));
    let (got, _) =
        copy_hashing(&mut file, &to, expected.algorithm()).map_err(|e| format!("{}: {e}", from.display()))?;
    if got != expected {
        return Err(damaged(digest, &got, input));
    }
    staged.files.insert(digest.to_owned(), to);
    Ok(true)
}

/// Which name an index.json entry carries: an image (tag or digest) or a referrers list.
enum Named {
    Image(ImageRef),
    Referrers(ImageRef),
}

fn entry_name(entry: &serde_json::Value) -> Result<Option<Named>, String> {
    let annotation = |k: &str| entry.get("annotations").and_then(|a| a.get(k)).and_then(|v| v.as_str());
    if let Some(subject) = annotation(REFERRERS_OF) {
        return parse_image(subject).map(|i| Some(Named::Referrers(i)));
    }
    // Docker's `docker save` and containerd put the full name here, skopeo in ref.name.
    let full = annotation(CONTAINERD_NAME).or(annotation(REF_NAME).filter(|n| n.contains('/')));
    match full {
        Some(name) => parse_image(name).map(|i| Some(Named::Image(i))),
        None => Ok(None),
    }
}

/// Imports the layout at `input` (directory or tar) into the cache under `cache_dir`.
pub fn import(cache_dir: &Path, input: &Path) -> Result<Imported, String> {
    let root = cache_dir.join("v1");
    for sub in ["blobs", "manifests", "tags", "tmp", "import"] {
        fs::create_dir_all(root.join(sub)).map_err(|e| format!("{}: {e}", root.display()))?;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut staged = Staged {
        dir: root.join("import").join(format!("{}-{stamp}", std::process::id())),
        files: BTreeMap::new(),
        index: Vec::new(),
    };
    fs::create_dir_all(&staged.dir).map_err(|e| e.to_string())?;
    let is_dir = input.is_dir();
    if is_dir {
        staged.index = fs::read(input.join("index.json"))
            .map_err(|e| format!("{}: not an OCI image layout (index.json: {e})", input.display()))?;
    } else {
        stage_tar(input, &mut staged)?;
        if staged.index.is_empty() {
            return Err(format!(
                "{}: not an OCI image layout (no index.json; a `docker save` from Docker before 25 must be converted, e.g. with skopeo copy docker-archive:… oci-archive:…)",
                input.display()
            ));
        }
    }
    let index: serde_json::Value =
        serde_json::from_slice(&staged.index).map_err(|e| format!("{}: index.json: {e}", input.display()))?;
    let entries = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();

    // Walk every named entry; collect what to commit, verifying before anything moves.
    let mut manifests: BTreeMap<String, String> = BTreeMap::new(); // digest -> media type
    let mut blobs: BTreeSet<String> = BTreeSet::new();
    let mut names: Vec<(Named, String, String)> = Vec::new(); // (name, digest, media type)
    let mut held: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for entry in &entries {
        let Some(named) = entry_name(entry)? else { continue };
        let digest = entry
            .get("digest")
            .and_then(|d| d.as_str())
            .unwrap_or_default()
            .to_owned();
        let media_type = entry
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or(oci::OCI_MANIFEST)
            .to_owned();
        let image = match &named {
            Named::Image(i) | Named::Referrers(i) => i.clone(),
        };
        let pair = (image.registry.clone(), image.repo.clone());
        let mut stack = vec![(digest.clone(), media_type.clone(), true)];
        while let Some((d, mt, required)) = stack.pop() {
            if manifests.contains_key(&d) {
                held.entry(pair.clone()).or_default().insert(d);
                continue;
            }
            let present = if is_dir {
                stage_dir_blob(input, &d, &mut staged)?
            } else {
                staged.files.contains_key(&d)
            };
            if !present {
                if required {
                    return Err(format!(
                        "{}: manifest {d} named in index.json is not in it",
                        input.display()
                    ));
                }
                continue; // a platform not carried
            }
            let bytes = fs::read(&staged.files[&d]).map_err(|e| e.to_string())?;
            let (children, layer_blobs) = references(&bytes);
            let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let mt = doc.get("mediaType").and_then(|m| m.as_str()).map_or(mt, str::to_owned);
            for (b, _) in layer_blobs {
                let present = if is_dir {
                    stage_dir_blob(input, &b, &mut staged)?
                } else {
                    staged.files.contains_key(&b)
                };
                let cached = b
                    .parse::<Digest>()
                    .is_ok_and(|bd| path_in(&root, Kind::Blob, &bd).exists());
                if !present && !cached {
                    return Err(format!("{}: blob {b} of {d} is not in it", input.display()));
                }
                held.entry(pair.clone()).or_default().insert(b.clone());
                blobs.insert(b);
            }
            held.entry(pair.clone()).or_default().insert(d.clone());
            let child_type = oci::OCI_MANIFEST.to_owned();
            stack.extend(children.into_iter().map(|c| (c, child_type.clone(), false)));
            manifests.insert(d, mt);
        }
        names.push((named, digest, media_type));
    }
    if names.is_empty() {
        return Err(format!(
            "{}: index.json names no image in full (registry/repository:tag); nothing to import",
            input.display()
        ));
    }

    // Commit: content first (each file durable, then renamed into place), then names.
    let mut report = Imported::default();
    for b in &blobs {
        let Some(staged_file) = staged.files.get(b) else {
            report.present += 1; // already cached
            continue;
        };
        let digest: Digest = b.parse().map_err(|_| format!("invalid digest {b}"))?;
        let dest = path_in(&root, Kind::Blob, &digest);
        if dest.exists() {
            report.present += 1;
            continue;
        }
        place(staged_file, &dest).map_err(|e| format!("committing {b}: {e}"))?;
        report.new += 1;
        report.bytes += fs::metadata(&dest).map_or(0, |m| m.len());
    }
    for (d, media_type) in &manifests {
        let digest: Digest = d.parse().map_err(|_| format!("invalid digest {d}"))?;
        let dest = path_in(&root, Kind::Manifest, &digest);
        if dest.exists() {
            report.present += 1;
            continue;
        }
        let bytes = fs::read(&staged.files[d]).map_err(|e| e.to_string())?;
        let tmp = staged.dir.join(format!("manifest-{}", digest.hex()));
        let mut out = fs::File::create(&tmp).map_err(|e| e.to_string())?;
        out.write_all(media_type.as_bytes())
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.write_all(&bytes))
            .and_then(|()| out.sync_all())
            .map_err(|e| format!("committing {d}: {e}"))?;
        place(&tmp, &dest).map_err(|e| format!("committing {d}: {e}"))?;
        report.new += 1;
        report.bytes += bytes.len() as u64;
    }
    let tags = TagStore::new(&root);
    for (named, digest, media_type) in &names {
        let (image, tag, accept) = match named {
            Named::Image(i) if i.reference.contains(':') => continue, // by digest: no tag to record
            Named::Image(i) => (i, i.reference.clone(), oci::AcceptSet::ALL.bits()),
            Named::Referrers(i) => (i, format!("referrers/{}", i.reference), 0),
        };
        let key = TagKey {
            upstream: image.registry.clone(),
            repo: image.repo.clone(),
            tag,
            accept,
        };
        let d: Digest = digest.parse().map_err(|_| format!("invalid digest {digest}"))?;
        if tags.get(&key).is_some_and(|r| r.digest.as_str() == digest) {
            continue;
        }
        let size = fs::metadata(path_in(&root, Kind::Manifest, &d)).map_or(0, |m| m.len());
        tags.put(TagRecord::new(&key, &d, media_type, size), true)
            .map_err(|e| format!("recording {image}: {e}"))?;
        report.names += 1;
    }
    record_holders(&root, &held).map_err(|e| format!("recording which repositories hold what: {e}"))?;
    Ok(report)
}

/// Moves a durable staged file into place and makes the rename durable too.
fn place(from: &Path, dest: &Path) -> io::Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    fs::rename(from, dest)?;
    fs::File::open(parent)?.sync_all()
}

/// Appends the (upstream, repo) pairs that now hold each digest to the associations log
/// (only lines it does not have yet, so importing twice changes nothing).
fn record_holders(root: &Path, held: &BTreeMap<(String, String), BTreeSet<String>>) -> io::Result<()> {
    let path = root.join("associations");
    let existing: BTreeSet<String> = fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let mut lines = String::new();
    for ((upstream, repo), digests) in held {
        for d in digests {
            let line = format!("{d} {upstream} {repo}");
            if !existing.contains(&line) {
                lines.push_str(&line);
                lines.push('\n');
            }
        }
    }
    if lines.is_empty() {
        return Ok(());
    }
    let mut log = fs::OpenOptions::new().create(true).append(true).open(&path)?;
    log.write_all(lines.as_bytes())
}
