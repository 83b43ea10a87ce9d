//! `export`, `import`, `backup create|verify|restore` and `import-mcphub`.
//!
//! Data moves over the admin API (`/admin/database/export` and `/import`),
//! so these work against any running server, embedded or production. Files
//! are checked here before anything is sent: an import or restore of a
//! corrupted or truncated file stops with a message and sends nothing.

use hybridstore_api::ImportAnswer;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use hybridstore_transfer::{
    AtomicFile, BackupWriter, Counts, Line, TransferError, parse_line, read_export,
};
use serde_json::{Map, Value, json};

use crate::{Client, Failure, Outcome};

/// How much of an import body goes in one chunk (what the bar advances by).
const UPLOAD_CHUNK: usize = 64 * 1024;

fn failed(err: TransferError) -> Failure {
    Failure::local(err.to_string())
}

/// Splits a byte stream into export lines, checking each.
#[derive(Default)]
struct LineSplitter {
    pending: Vec<u8>,
    number: u64,
    ended: bool,
}

impl LineSplitter {
    fn feed(
        &mut self,
        bytes: &[u8],
        mut each: impl FnMut(&Line, &[u8]) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        self.pending.extend_from_slice(bytes);
        while let Some(at) = self.pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=at).collect();
            self.number += 1;
            let text = std::str::from_utf8(&raw)
                .map_err(|_| Failure::remote(format!("line {}: not UTF-8", self.number)))?;
            let line = parse_line(text.trim_end(), self.number).map_err(failed)?;
            self.ended = matches!(line, Line::End(_));
            each(&line, &raw)?;
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), Failure> {
        if !self.pending.is_empty() || !self.ended {
            return Err(Failure::remote(
                "the export broke off before its end line (see the server's log)".into(),
            ));
        }
        Ok(())
    }
}

/// Reads a whole export file (gzipped or not), checked line by line.
fn read_checked(path: &Path) -> Result<Vec<u8>, Failure> {
    let unreadable = |err: std::io::Error| Failure::local(format!("{}: {err}", path.display()));
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        // Standard input, plain or gzipped (`zcat x.gz | ... import -`
        // or `... import - < x.gz`).
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut raw).map_err(unreadable)?;
        if raw.starts_with(&[0x1f, 0x8b]) {
            std::io::Read::read_to_end(
                &mut flate2::read::MultiGzDecoder::new(&raw[..]),
                &mut bytes,
            )
            .map_err(unreadable)?;
        } else {
            bytes = raw;
        }
    } else {
        let mut reader = hybridstore_transfer::open_maybe_gzip(path).map_err(failed)?;
        std::io::Read::read_to_end(&mut reader, &mut bytes).map_err(unreadable)?;
    }
    read_export(&bytes[..], |_| Ok(()))
        .map_err(|err| Failure::local(format!("{}: {err}", path.display())))?;
    Ok(bytes)
}

impl Client {
    /// Streams `GET /admin/database/export`, calling `each` per line.
    async fn fetch_export(
        &self,
        mut each: impl FnMut(&Line, &[u8]) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let url = format!("{}/admin/database/export", self.base);
        let mut response = self
            .authorized(self.http.get(&url))
            .send()
            .await
            .map_err(|err| {
                Failure::remote(format!("cannot reach {url}: {}", super::with_causes(&err)))
            })?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            self.refused_token(status)?;
            let body: Value = response.json().await.unwrap_or(Value::Null);
            return Err(super::refusal(status, body));
        }
        let mut splitter = LineSplitter::default();
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|err| Failure::remote(format!("the export broke off: {err}")))?;
            match chunk {
                Some(bytes) => splitter.feed(&bytes, &mut each)?,
                None => return splitter.finish(),
            }
        }
    }

    pub(crate) async fn export(&self, output: Option<PathBuf>, gzip: bool) -> Outcome {
        let Some(path) = output else {
            self.export_into(&mut std::io::stdout().lock()).await?;
            return Ok(ExitCode::SUCCESS);
        };
        let gzip = gzip || path.extension().is_some_and(|ext| ext == "gz");
        // Streamed to a temporary file, renamed into place only once the end
        // line came: a broken export never stands under the final name.
        let file = AtomicFile::create(&path).map_err(failed)?;
        let write_failed =
            |err: std::io::Error| Failure::local(format!("{}: {err}", path.display()));
        let counts = if gzip {
            let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            let counts = self.export_into(&mut encoder).await?;
            encoder
                .finish()
                .map_err(write_failed)?
                .commit()
                .map_err(failed)?;
            counts
        } else {
            let mut file = file;
            let counts = self.export_into(&mut file).await?;
            file.commit().map_err(failed)?;
            counts
        };
        eprintln!(
            "exported {} records, {} deletions, {} counter values to {}",
            counts.total_records(),
            counts.deletions,
            counts.counters,
            path.display()
        );
        Ok(ExitCode::SUCCESS)
    }

    /// Writes the whole export into `out`; returns what it held (records,
    /// deletions, counter values: not its header and end lines).
    async fn export_into(&self, out: &mut impl Write) -> Result<Counts, Failure> {
        let mut counts = Counts::default();
        let progress = super::export_progress(self.json, "exporting");
        self.fetch_export(|line, raw| {
            counts.add(line);
            progress.inc(1);
            out.write_all(raw)
                .map_err(|err| Failure::local(format!("writing the export: {err}")))
        })
        .await?;
        progress.finish_and_clear();
        Ok(counts)
    }

    /// Sends a checked export to `/admin/database/import`.
    async fn send_import(&self, bytes: Vec<u8>, force: bool) -> Outcome {
        use futures_util::StreamExt;
        let path = format!("/admin/database/import?force={force}");
        let url = format!("{}{path}", self.base);
        // Sent in chunks, so that a bar can follow the upload; then the
        // server checks every line and applies them, and answers.
        let progress = super::upload_progress(self.json, bytes.len() as u64);
        let sent = progress.clone();
        let total = bytes.len();
        let chunks: Vec<Vec<u8>> = bytes.chunks(UPLOAD_CHUNK).map(<[u8]>::to_vec).collect();
        let body = futures_util::stream::iter(chunks).map(move |chunk| {
            sent.inc(chunk.len() as u64);
            if sent.position() as usize >= total {
                super::waiting_on_server(&sent, total as u64);
            }
            Ok::<_, std::io::Error>(chunk)
        });
        let response = self
            .authorized(self.http.post(&url))
            .header("content-type", "application/x-ndjson")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .inspect(|_| progress.finish_and_clear())
            .map_err(|err| {
                Failure::remote(format!("cannot reach {url}: {}", super::with_causes(&err)))
            })?;
        let status = response.status().as_u16();
        self.refused_token(status)?;
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            return Err(super::refusal(status, body));
        }
        let answer: ImportAnswer = super::decode("/admin/database/import", body)?;
        if self.json {
            self.print_json(&answer);
        } else {
            let report = &answer.report;
            println!(
                "records: {} applied, {} skipped (already as new); counters: {} applied, {} skipped",
                report.applied.values().sum::<u64>(),
                report.skipped.values().sum::<u64>(),
                report.counters_applied,
                report.counters_skipped
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) async fn import(&self, file: &Path, force: bool) -> Outcome {
        let bytes = read_checked(file)?;
        self.send_import(bytes, force).await
    }

    pub(crate) async fn backup_create(&self, dir: &Path, keep: Option<usize>) -> Outcome {
        let mut writer = BackupWriter::create(dir).map_err(failed)?;
        let progress = super::export_progress(self.json, "backing up");
        self.fetch_export(|line, _| {
            progress.inc(1);
            writer.write(line).map_err(failed)
        })
        .await?;
        progress.finish_and_clear();
        let (path, manifest) = writer.finish().map_err(failed)?;
        if let Some(keep) = keep {
            for removed in hybridstore_transfer::prune(dir, keep.max(1)).map_err(failed)? {
                eprintln!("removed {}", removed.display());
            }
        }
        if self.json {
            self.print_json(&serde_json::to_value(&manifest).unwrap_or_default());
        } else {
            println!(
                "{}: {} records, {} deletions, {} counter values, sha256 {}",
                path.display(),
                manifest.counts.total_records(),
                manifest.counts.deletions,
                manifest.counts.counters,
                manifest.sha256
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) fn backup_verify(&self, file: &Path) -> Outcome {
        match hybridstore_transfer::verify(file) {
            Ok((data, manifest)) if self.json => {
                self.print_json(&json!({
                    "ok": true,
                    "data": data.display().to_string(),
                    "manifest": serde_json::to_value(&manifest).unwrap_or_default(),
                }));
                Ok(ExitCode::SUCCESS)
            }
            Ok((data, manifest)) => {
                println!(
                    "ok: {} ({} records, {} deletions, {} counter values, sha256 matches)",
                    data.display(),
                    manifest.counts.total_records(),
                    manifest.counts.deletions,
                    manifest.counts.counters
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(err) if self.json => {
                self.print_json(&json!({"ok": false, "error": err.to_string()}));
                Ok(ExitCode::from(1))
            }
            Err(err) => {
                eprintln!("hybridstore: backup verification failed: {err}");
                Ok(ExitCode::from(1))
            }
        }
    }

    pub(crate) async fn backup_restore(&self, file: &Path, force: bool) -> Outcome {
        let data = match hybridstore_transfer::verify(file) {
            Ok((data, _)) => data,
            Err(err) => {
                eprintln!("hybridstore: not restoring, the backup failed verification: {err}");
                return Ok(ExitCode::from(1));
            }
        };
        let bytes = read_checked(&data)?;
        self.send_import(bytes, force).await
    }

    /// Maps an MCP hub's `mcp_settings.json` onto collections and writes
    /// what differs (see README, "Legacy JSON import").
    pub(crate) async fn import_mcphub(&self, file: &Path, dry_run: bool) -> Outcome {
        let text = std::fs::read(file)
            .map_err(|err| Failure::local(format!("{}: {err}", file.display())))?;
        let settings: Value = match serde_json::from_slice(&text) {
            Ok(value) => value,
            Err(err) => {
                eprintln!(
                    "hybridstore: {}: not JSON: {err}; nothing changed",
                    file.display()
                );
                return Ok(ExitCode::from(1));
            }
        };
        let records = match map_mcphub(&settings) {
            Ok(records) => records,
            Err(problems) => {
                eprintln!(
                    "hybridstore: {} is not a valid hub settings file; nothing changed:",
                    file.display()
                );
                for problem in problems {
                    eprintln!("  {problem}");
                }
                return Ok(ExitCode::from(1));
            }
        };
        let mut report: std::collections::BTreeMap<&str, [u64; 3]> = Default::default();
        for (collection, id, data) in &records {
            let path = format!("/v1/collections/{collection}/records/{id}");
            let (status, current) = self.call(reqwest::Method::GET, &path).await?;
            let slot = match status {
                200 if current["data"] == *data => 1,
                200 => 2,
                404 => 0,
                other => {
                    return Err(Failure::remote(format!(
                        "reading {path}: the server answered {other}"
                    )));
                }
            };
            report.entry(collection).or_default()[slot] += 1;
            if slot != 1 && !dry_run {
                self.expect_with(reqwest::Method::PUT, &path, data).await?;
            }
        }
        let summary: Map<String, Value> = report
            .iter()
            .map(|(collection, [created, unchanged, updated])| {
                (
                    collection.to_string(),
                    json!({"created": created, "unchanged": unchanged, "updated": updated}),
                )
            })
            .collect();
        if self.json {
            self.print_json(&json!({"dry_run": dry_run, "collections": summary}));
        } else {
            let verb = if dry_run { "would be" } else { "were" };
            for (collection, [created, unchanged, updated]) in &report {
                println!(
                    "{collection:<12} {created} {verb} created, {updated} {verb} updated, {unchanged} unchanged"
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

type Mapped = Vec<(&'static str, String, Value)>;

/// The records an MCP hub settings file maps to, or every problem found.
fn map_mcphub(settings: &Value) -> Result<Mapped, Vec<String>> {
    let mut records = Vec::new();
    let mut problems = Vec::new();
    let Some(top) = settings.as_object() else {
        return Err(vec!["the file must hold a JSON object".into()]);
    };
    let valid_id = |id: &str| hybridstore_core::RecordId::parse(id).is_ok();
    match top.get("mcpServers") {
        None => {}
        Some(Value::Object(servers)) => {
            for (name, server) in servers {
                match server {
                    Value::Object(config) if valid_id(name) => {
                        let mut data = config.clone();
                        data.insert("name".into(), json!(name));
                        records.push(("mcp_servers", name.clone(), Value::Object(data)));
                    }
                    Value::Object(_) => problems.push(format!(
                        "mcpServers: {name:?} cannot be a record id (letters, digits, ._:@-)"
                    )),
                    _ => problems.push(format!("mcpServers.{name}: must be an object")),
                }
            }
        }
        Some(_) => problems.push("mcpServers: must be an object of servers by name".into()),
    }
    let mut listed = |key: &str, collection: &'static str, id_field: &str| match top.get(key) {
        None => {}
        Some(Value::Array(items)) => {
            let mut seen = std::collections::HashSet::new();
            for (i, item) in items.iter().enumerate() {
                let id = item.get(id_field).and_then(Value::as_str);
                match (item, id) {
                    (Value::Object(_), Some(id)) if !valid_id(id) => problems.push(format!(
                        "{key}[{i}].{id_field}: {id:?} cannot be a record id"
                    )),
                    (Value::Object(_), Some(id)) if !seen.insert(id.to_owned()) => {
                        problems.push(format!("{key}[{i}].{id_field}: {id:?} appears twice"))
                    }
                    (Value::Object(_), Some(id)) => {
                        records.push((collection, id.to_owned(), item.clone()))
                    }
                    _ => problems.push(format!(
                        "{key}[{i}]: must be an object with a string {id_field:?}"
                    )),
                }
            }
        }
        Some(_) => problems.push(format!("{key}: must be an array")),
    };
    listed("users", "users", "username");
    listed("groups", "groups", "id");
    // Every other object of the hub's settings (`userConfigs`, and what
    // later hub versions add) is kept whole as a settings record under its
    // key, as `systemConfig` is: nothing of the file is dropped.
    for (key, value) in top {
        if ["mcpServers", "users", "groups"].contains(&key.as_str()) {
            continue;
        }
        match value {
            Value::Object(_) if valid_id(key) => {
                records.push(("settings", key.clone(), value.clone()))
            }
            Value::Object(_) => problems.push(format!("{key:?} cannot be a record id")),
            _ => problems.push(format!(
                "{key}: an unknown key whose value is not an object"
            )),
        }
    }
    if problems.is_empty() {
        Ok(records)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_file_maps_onto_collections() {
        let settings = json!({
            "mcpServers": {"fetch": {"command": "uvx", "args": ["mcp-server-fetch"]}},
            "users": [{"username": "admin", "password": "$2b$...", "isAdmin": true}],
            "groups": [{"id": "g1", "name": "dev", "servers": ["fetch"]}],
            "systemConfig": {"routing": {"enableGlobalRoute": true}},
            "userConfigs": {"admin": {"routing": {"enableGlobalRoute": false}}}
        });
        let records = map_mcphub(&settings).unwrap();
        let ids: Vec<(&str, &str)> = records.iter().map(|(c, id, _)| (*c, id.as_str())).collect();
        assert_eq!(
            ids,
            [
                ("mcp_servers", "fetch"),
                ("users", "admin"),
                ("groups", "g1"),
                ("settings", "systemConfig"),
                ("settings", "userConfigs"),
            ]
        );
        assert_eq!(
            records[0].2["name"], "fetch",
            "the unique index field is filled in"
        );
    }

    #[test]
    fn every_problem_of_a_malformed_file_is_reported() {
        let settings = json!({
            "mcpServers": {"bad name": {}, "ok": 3},
            "users": [{"username": "a"}, {"username": "a"}, {"name": "no username"}],
            "extra": true
        });
        let problems = map_mcphub(&settings).unwrap_err();
        assert_eq!(problems.len(), 5, "{problems:?}");
    }
}
