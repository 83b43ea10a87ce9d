use super::*;

fn sample() -> Vec<Line> {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let record: Record = serde_json::from_value(serde_json::json!({
        "collection": "accounts", "id": "a1", "version": 7, "data": {"n": 1},
        "created_at": "2026-11-22T08:00:00Z", "updated_at": "2026-11-22T08:00:01Z"
    }))
    .unwrap();
    let counter: CounterValue = serde_json::from_value(serde_json::json!({
        "scope": "usage:k1", "granularity": "total", "bucket_start": "1970-01-01T00:00:00Z",
        "field": "cost", "value": "0.5"
    }))
    .unwrap();
    let deletion = Deletion {
        collection: CollectionName::parse("accounts").unwrap(),
        id: RecordId::parse("gone").unwrap(),
        version: Version::new(9),
        at: now,
    };
    let mut header = Header::new(Source {
        backend: "sqlite".into(),
        instance: "test".into(),
        service_version: "0".into(),
    });
    header.created_at = now;
    let mut counts = Counts::default();
    let body = vec![
        Line::Record(record),
        Line::Deletion(deletion),
        Line::Counter(counter),
    ];
    for line in &body {
        counts.add(line);
    }
    let mut lines = vec![Line::Header(header)];
    lines.extend(body);
    lines.push(Line::End(counts));
    lines
}

fn backup(dir: &Path) -> PathBuf {
    let mut writer = BackupWriter::create(dir).unwrap();
    for line in sample() {
        writer.write(&line).unwrap();
    }
    writer.finish().unwrap().0
}

#[test]
fn lines_round_trip() {
    for line in sample() {
        let bytes = encode_line(&line);
        let text = std::str::from_utf8(&bytes).unwrap().trim_end();
        assert_eq!(parse_line(text, 1).unwrap(), line, "{text}");
    }
}

#[test]
fn a_backup_verifies_and_reads_back_every_line() {
    let dir = tempfile::tempdir().unwrap();
    let manifest_path = backup(dir.path());
    let (data, manifest) = verify(&manifest_path).unwrap();
    assert_eq!(manifest.counts.total_records(), 1);
    assert_eq!(
        (manifest.counts.deletions, manifest.counts.counters),
        (1, 1)
    );
    let mut read = Vec::new();
    read_export(open_maybe_gzip(&data).unwrap(), |line| {
        read.push(line);
        Ok(())
    })
    .unwrap();
    assert_eq!(read, sample()[1..4].to_vec());
    assert!(verify(&data).is_ok(), "named by its data file too");
}

#[test]
fn a_flipped_byte_or_a_cut_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = locate(&backup(dir.path())).unwrap();
    let original = std::fs::read(&data).unwrap();

    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(&data, &flipped).unwrap();
    let err = verify(&data).unwrap_err().to_string();
    assert!(err.contains("sha256") && err.contains("corrupted"), "{err}");

    std::fs::write(&data, &original[..original.len() - 10]).unwrap();
    let err = verify(&data).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn an_export_without_its_end_line_is_refused() {
    let mut text = Vec::new();
    for line in &sample()[..4] {
        text.extend(encode_line(line));
    }
    let err = read_export(&text[..], |_| Ok(())).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    let garbage = b"{\"type\":\"header\"";
    assert!(read_export(&garbage[..], |_| Ok(())).is_err());
}

#[test]
fn retention_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let mut made = Vec::new();
    for _ in 0..4 {
        made.push(backup(dir.path()));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let removed = prune(dir.path(), 2).unwrap();
    assert_eq!(removed.len(), 4, "two manifests and their data files");
    assert!(!made[0].exists() && !made[1].exists());
    assert!(verify(&made[2]).is_ok() && verify(&made[3]).is_ok());
}
