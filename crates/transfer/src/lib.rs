//! Moving data in and out: the export format and backup files.
//!
//! An export is NDJSON, one JSON object per line, each with a `type`: a
//! `header` first (format and version, where it came from), then every
//! `record` and `deletion` marker of every collection, then every `counter`
//! value, and an `end` line with the counts. A file without its `end` line,
//! or whose counts disagree, was cut short and is refused. The same lines
//! move data from embedded mode to production and back (`hybridstore
//! export` / `import`).
//!
//! A backup is such an export, gzipped, plus a manifest beside it (counts
//! per collection, sha256 and size of the file, format version, source).
//! Both are written under temporary names, flushed to disk and then renamed,
//! data file first: a backup exists under its final name only once it is
//! complete, and a crash leaves at worst a `.tmp` file that retention
//! removes. `verify` checks the checksum, parses every line and compares the
//! counts, so a flipped byte or a truncated file is found before a restore
//! writes anything.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use hybridstore_core::{CollectionName, CounterValue, Record, RecordId, Version};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The `format` of every header.
pub const FORMAT: &str = "hybridstore-export";
/// The version of the line format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The `format` of every manifest.
pub const MANIFEST_FORMAT: &str = "hybridstore-backup";

/// One line of an export.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Header(Header),
    Record(Record),
    Deletion(Deletion),
    Counter(CounterValue),
    End(Counts),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub source: Source,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl Header {
    pub fn new(source: Source) -> Self {
        Self {
            format: FORMAT.to_owned(),
            version: FORMAT_VERSION,
            source,
            created_at: OffsetDateTime::now_utc(),
        }
    }
}

/// Where an export came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The durable tier (`postgres`, `sqlite`).
    pub backend: String,
    /// The instance that wrote it.
    pub instance: String,
    /// The hybridstore version that wrote it.
    pub service_version: String,
}

/// A record deleted at `version` (kept so an import never resurrects an
/// older version of it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deletion {
    pub collection: CollectionName,
    pub id: RecordId,
    pub version: Version,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// What an export holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Live records per collection.
    pub records: BTreeMap<String, u64>,
    pub deletions: u64,
    pub counters: u64,
}

impl Counts {
    /// Counts one line (headers and end lines count nothing).
    pub fn add(&mut self, line: &Line) {
        match line {
            Line::Record(record) => {
                *self
                    .records
                    .entry(record.collection.to_string())
                    .or_default() += 1;
            }
            Line::Deletion(_) => self.deletions += 1,
            Line::Counter(_) => self.counters += 1,
            Line::Header(_) | Line::End(_) => {}
        }
    }

    pub fn total_records(&self) -> u64 {
        self.records.values().sum()
    }
}

/// Why an export or a backup was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("line {line}: {problem}")]
    Line { line: u64, problem: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> TransferError + '_ {
    move |source| TransferError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Parses one line (`number` counts from 1, for messages).
pub fn parse_line(text: &str, number: u64) -> Result<Line, TransferError> {
    serde_json::from_str(text).map_err(|err| {
        // The source's own word that it could not go on (see `failed_line`).
        if let Ok(failed) = serde_json::from_str::<Failed>(text)
            && failed.kind == FAILED
        {
            return TransferError::Line {
                line: number,
                problem: format!("the export failed at its source: {}", failed.reason),
            };
        }
        TransferError::Line {
            line: number,
            problem: err.to_string(),
        }
    })
}

/// The `type` of the line an export stream ends with when its source could
/// not go on: never a [`Line`], so every reader refuses the export.
const FAILED: &str = "failed";

#[derive(Serialize, Deserialize)]
struct Failed {
    #[serde(rename = "type")]
    kind: String,
    reason: String,
}

/// The last line of an export stream whose source failed half-way: the
/// client sees why, and no importer takes the export for a complete one.
pub fn failed_line(reason: &str) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&Failed {
        kind: FAILED.to_owned(),
        reason: reason.to_owned(),
    })
    .expect("a failed line always serializes");
    bytes.push(b'\n');
    bytes
}

/// One line as bytes, newline included.
pub fn encode_line(line: &Line) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(line).expect("export lines always serialize");
    bytes.push(b'\n');
    bytes
}

/// Checks a whole export, line by line: a header of a known format first,
/// an `end` line last whose counts match what came before. Calls `each`
/// with every data line. Returns the header and the counts.
pub fn read_export(
    reader: impl BufRead,
    mut each: impl FnMut(Line) -> Result<(), TransferError>,
) -> Result<(Header, Counts), TransferError> {
    let mut header = None;
    let mut counts = Counts::default();
    let mut ended = None;
    let mut number = 0;
    for text in reader.lines() {
        number += 1;
        let text = text.map_err(|err| TransferError::Line {
            line: number,
            problem: format!("unreadable: {err}"),
        })?;
        if ended.is_some() {
            return Err(TransferError::Line {
                line: number,
                problem: "data after the end line".into(),
            });
        }
        let line = parse_line(&text, number)?;
        match line {
            Line::Header(found) => {
                if number != 1 {
                    return Err(TransferError::Line {
                        line: number,
                        problem: "a second header".into(),
                    });
                }
                if found.format != FORMAT || found.version != FORMAT_VERSION {
                    return Err(TransferError::Invalid(format!(
                        "unknown format {:?} version {} (this build reads {FORMAT} version {FORMAT_VERSION})",
                        found.format, found.version
                    )));
                }
                header = Some(found);
            }
            _ if header.is_none() => {
                return Err(TransferError::Line {
                    line: number,
                    problem: "no header: not a hybridstore export".into(),
                });
            }
            Line::End(stated) => ended = Some(stated),
            line => {
                counts.add(&line);
                each(line)?;
            }
        }
    }
    let header = header.ok_or_else(|| TransferError::Invalid("empty: no header".into()))?;
    match ended {
        None => Err(TransferError::Invalid(format!(
            "truncated: no end line after {number} lines"
        ))),
        Some(stated) if stated != counts => Err(TransferError::Invalid(format!(
            "the end line counts {stated:?} but the file holds {counts:?}"
        ))),
        Some(_) => Ok((header, counts)),
    }
}

/// Reads a file that may be gzipped (told by its first bytes).
pub fn open_maybe_gzip(path: &Path) -> Result<Box<dyn BufRead>, TransferError> {
    let mut file = BufReader::new(File::open(path).map_err(io_error(path))?);
    let gzipped = file
        .fill_buf()
        .map_err(io_error(path))?
        .starts_with(&[0x1f, 0x8b]);
    Ok(if gzipped {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(file)))
    } else {
        Box::new(file)
    })
}

/// The manifest beside a backup file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// The data file's name, in the same directory.
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub source: Source,
    #[serde(flatten)]
    pub counts: Counts,
}

/// A writer that hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A file written under a temporary name beside its final one (`.{name}.tmp`)
/// and moved into place only by [`AtomicFile::commit`], after its content and
/// the rename reached the disk. Dropped uncommitted, it removes the
/// temporary file: the final name never holds a half-written file.
pub struct AtomicFile {
    path: PathBuf,
    temp: PathBuf,
    out: Option<io::BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self, TransferError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = path.with_file_name(format!(".{name}{TEMP_SUFFIX}"));
        let file = File::create(&temp).map_err(io_error(&temp))?;
        Ok(Self {
            path: path.to_owned(),
            temp,
            out: Some(io::BufWriter::new(file)),
        })
    }

    pub fn commit(mut self) -> Result<(), TransferError> {
        let out = self.out.take().expect("committed once");
        let file = out.into_inner().map_err(|err| TransferError::Io {
            path: self.temp.display().to_string(),
            source: err.into_error(),
        })?;
        file.sync_all().map_err(io_error(&self.temp))?;
        drop(file);
        std::fs::rename(&self.temp, &self.path).map_err(io_error(&self.path))?;
        match self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => sync_dir(dir),
            None => sync_dir(Path::new(".")),
        }
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.as_mut().expect("not yet committed").write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.as_mut().expect("not yet committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Writes `content` to `path` through an [`AtomicFile`].
pub fn write_atomically(path: &Path, content: &[u8]) -> Result<(), TransferError> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(content).map_err(io_error(path))?;
    file.commit()
}

/// Makes renames in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), TransferError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Writes one backup: feed it the export's lines, then `finish`.
pub struct BackupWriter {
    dir: PathBuf,
    name: String,
    out: flate2::write::GzEncoder<Hashing<AtomicFile>>,
    header: Option<Header>,
    counts: Counts,
    ended: bool,
}

/// The file name stem of a backup made at `at`:
/// `hybridstore-20261122T084500123Z`.
pub fn backup_stem(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "hybridstore-{:04}{:02}{:02}T{:02}{:02}{:02}{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

const DATA_SUFFIX: &str = ".ndjson.gz";
const MANIFEST_SUFFIX: &str = ".manifest.json";
/// Temporary files are `.{final name}.tmp`.
const TEMP_SUFFIX: &str = ".tmp";
/// A temporary file this old was left by a crash, not by a backup running now.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

impl BackupWriter {
    /// Starts a backup in `dir` (created if needed).
    pub fn create(dir: &Path) -> Result<Self, TransferError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let name = format!("{}{DATA_SUFFIX}", backup_stem(OffsetDateTime::now_utc()));
        let file = AtomicFile::create(&dir.join(&name))?;
        let out = flate2::write::GzEncoder::new(
            Hashing {
                inner: file,
                hasher: Sha256::new(),
                bytes: 0,
            },
            flate2::Compression::fast(),
        );
        Ok(Self {
            dir: dir.to_owned(),
            name,
            out,
            header: None,
            counts: Counts::default(),
            ended: false,
        })
    }

    /// Adds one line of the export, in order.
    pub fn write(&mut self, line: &Line) -> Result<(), TransferError> {
        match line {
            Line::Header(header) => self.header = Some(header.clone()),
            Line::End(stated) => {
                if *stated != self.counts {
                    return Err(TransferError::Invalid(format!(
                        "the export's end line counts {stated:?} but {:?} came",
                        self.counts
                    )));
                }
                self.ended = true;
            }
            line => self.counts.add(line),
        }
        let data = self.dir.join(&self.name);
        self.out
            .write_all(&encode_line(line))
            .map_err(io_error(&data))
    }

    /// Completes the backup: the data file, then the manifest, each made
    /// durable and renamed into place. Returns the manifest's path.
    pub fn finish(self) -> Result<(PathBuf, Manifest), TransferError> {
        let header = self
            .header
            .ok_or_else(|| TransferError::Invalid("the export had no header".into()))?;
        if !self.ended {
            return Err(TransferError::Invalid(
                "the export ended early (no end line)".into(),
            ));
        }
        let data = self.dir.join(&self.name);
        let Hashing {
            inner,
            hasher,
            bytes,
        } = self.out.finish().map_err(io_error(&data))?;
        inner.commit()?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_owned(),
            format_version: FORMAT_VERSION,
            file: self.name.clone(),
            bytes,
            sha256: hex(&hasher.finalize()),
            created_at: header.created_at,
            source: header.source,
            counts: self.counts,
        };
        let manifest_path = self.dir.join(manifest_name(&self.name));
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        write_atomically(&manifest_path, &json)?;
        Ok((manifest_path, manifest))
    }
}

fn manifest_name(data_name: &str) -> String {
    let stem = data_name.strip_suffix(DATA_SUFFIX).unwrap_or(data_name);
    format!("{stem}{MANIFEST_SUFFIX}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The manifest and data file of a backup named by either path.
pub fn locate(path: &Path) -> Result<(PathBuf, Manifest), TransferError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let manifest_path = if name.ends_with(MANIFEST_SUFFIX) {
        path.to_owned()
    } else {
        path.with_file_name(manifest_name(&name))
    };
    let text = std::fs::read(&manifest_path).map_err(io_error(&manifest_path))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|err| {
        TransferError::Invalid(format!(
            "{}: not a manifest: {err}",
            manifest_path.display()
        ))
    })?;
    if manifest.format != MANIFEST_FORMAT || manifest.format_version != FORMAT_VERSION {
        return Err(TransferError::Invalid(format!(
            "{}: unknown backup format {:?} version {}",
            manifest_path.display(),
            manifest.format,
            manifest.format_version
        )));
    }
    let data = manifest_path.with_file_name(&manifest.file);
    Ok((data, manifest))
}

/// Verifies a backup: size and sha256 of the data file, every line parsed,
/// counts equal to the manifest's. Returns the manifest and data path.
pub fn verify(path: &Path) -> Result<(PathBuf, Manifest), TransferError> {
    let (data, manifest) = locate(path)?;
    let mut file = File::open(&data).map_err(io_error(&data))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = file.read(&mut buffer).map_err(io_error(&data))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        bytes += read as u64;
    }
    if bytes != manifest.bytes {
        return Err(TransferError::Invalid(format!(
            "{}: {bytes} bytes, the manifest says {} (truncated or replaced)",
            data.display(),
            manifest.bytes
        )));
    }
    let sha256 = hex(&hasher.finalize());
    if sha256 != manifest.sha256 {
        return Err(TransferError::Invalid(format!(
            "{}: sha256 {sha256} differs from the manifest's {} (corrupted)",
            data.display(),
            manifest.sha256
        )));
    }
    let (_, counts) = read_export(open_maybe_gzip(&data)?, |_| Ok(()))?;
    if counts != manifest.counts {
        return Err(TransferError::Invalid(format!(
            "{}: holds {counts:?}, the manifest says {:?}",
            data.display(),
            manifest.counts
        )));
    }
    Ok((data, manifest))
}

/// Keeps the newest `keep` backups in `dir` and removes the rest (and any
/// temporary file a crash left behind); returns the removed paths.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>, TransferError> {
    let mut manifests = Vec::new();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.starts_with("hybridstore-") && !name.starts_with(".hybridstore-") {
            continue;
        }
        // Temporary files are removed by their writer unless it crashed.
        if name.ends_with(TEMP_SUFFIX) {
            // Only a crash's leftovers: a backup being written now is recent.
            let modified = std::fs::metadata(&path).and_then(|m| m.modified());
            let stale = modified
                .ok()
                .and_then(|at| at.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP);
            if stale {
                std::fs::remove_file(&path).map_err(io_error(&path))?;
                removed.push(path);
            }
        } else if name.ends_with(MANIFEST_SUFFIX) {
            manifests.push(path);
        }
    }
    // Names hold the time, so they sort oldest first.
    manifests.sort();
    let excess = manifests.len().saturating_sub(keep);
    for manifest in manifests.into_iter().take(excess) {
        // The manifest goes first: a backup without it is not a backup.
        let data = locate(&manifest).ok().map(|(data, _)| data);
        std::fs::remove_file(&manifest).map_err(io_error(&manifest))?;
        removed.push(manifest);
        if let Some(data) = data.filter(|d| d.exists()) {
            std::fs::remove_file(&data).map_err(io_error(&data))?;
            removed.push(data);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
