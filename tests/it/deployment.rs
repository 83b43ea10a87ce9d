//! Deployment files, checked offline with the tools that own their formats:
//! `docker-compose config` (the compose specification), `promtool` (rules and
//! config), and the service's own `/metrics` (what dashboards may query).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hybridstore_testkit::TestApp;
use serde_json::{Value, json};

use crate::observability::scrape;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|err| panic!("{program} (installed by scripts/test.sh): {err}"))
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `docker-compose config` against a compose file, with `.env.example`.
fn compose_config(file: &Path) -> Output {
    let file = file.to_str().unwrap();
    run(
        "docker-compose",
        &[
            "-f",
            file,
            "--env-file",
            ".env.example",
            "--profile",
            "monitoring",
            "config",
            "-q",
        ],
    )
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    let file = repo("docker-compose.hybrid.yml");
    assert_success(&compose_config(&file), "docker-compose config");

    // The check is real: a misspelt option fails it.
    let text = std::fs::read_to_string(&file).unwrap();
    let broken = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
    std::fs::write(
        broken.path(),
        text.replacen("    restart: unless-stopped", "    restrat: always", 1),
    )
    .unwrap();
    assert!(!compose_config(broken.path()).status.success());

    for service in ["hybridstore", "postgres", "redis"] {
        assert!(text.contains(&format!("  {service}:\n")), "{service}");
    }
    assert!(text.contains("--appendonly yes --appendfsync everysec"));
    assert!(text.contains("condition: service_healthy"));
    assert!(text.contains("profiles: [\"monitoring\"]"));
}

/// The `${NAME...}` references of a compose file.
fn variables(text: &str) -> BTreeSet<String> {
    text.split("${")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn every_compose_variable_is_documented_and_no_secret_is_written_down() {
    let compose = std::fs::read_to_string(repo("docker-compose.hybrid.yml")).unwrap();
    let example = std::fs::read_to_string(repo(".env.example")).unwrap();
    let documented: BTreeSet<String> = example
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim().to_owned()))
        .collect();
    let used = variables(&compose);
    assert!(used.len() >= 15, "{used:?}");
    let missing: Vec<_> = used.difference(&documented).collect();
    assert!(missing.is_empty(), "not in .env.example: {missing:?}");
    for line in compose.lines() {
        let upper = line.to_uppercase();
        if (upper.contains("PASSWORD:") || upper.contains("TOKEN:")) && !line.contains("${") {
            panic!("a secret written into the compose file: {line}");
        }
    }
    for line in example.lines().filter(|line| !line.starts_with('#')) {
        if let Some((name, value)) = line.split_once('=')
            && (name.contains("PASSWORD") || name.contains("TOKEN"))
            // A file's path is not the secret (HYBRIDSTORE_TOKENS_PATH).
            && !name.ends_with("_PATH")
        {
            assert!(value.starts_with("change-me"), "{name} holds a placeholder");
        }
    }
}

#[test]
fn the_alert_rules_pass_promtool() {
    assert_success(
        &run(
            "promtool",
            &["check", "config", "deploy/prometheus/prometheus.yml"],
        ),
        "promtool check config",
    );
    assert_success(
        &run(
            "promtool",
            &["check", "rules", "deploy/prometheus/alerts.yml"],
        ),
        "promtool check rules",
    );
    assert_success(
        &run(
            "promtool",
            &["test", "rules", "deploy/prometheus/alerts.test.yml"],
        ),
        "promtool test rules",
    );
    let rules = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    for alert in [
        "HybridstoreDown",
        "HybridstoreBackupFailed",
        "HybridstoreBackupMissing",
        "HybridstoreTierDown",
        "HybridstoreDegradedStrategy",
        "HybridstoreJournalBacklogGrowing",
        "HybridstoreHighErrorRate",
        "HybridstoreHighLatency",
        "HybridstoreLowCacheHitRate",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
}

/// Every metric name a PromQL expression mentions.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|token| {
            ["hybridstore_", "http_", "process_"]
                .iter()
                .any(|prefix| token.starts_with(prefix))
        })
        .map(str::to_owned)
        .collect()
}

/// Every `expr` string in the dashboard.
fn dashboard_exprs(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item) {
                    ("expr", Value::String(expr)) => found.push(expr.clone()),
                    _ => dashboard_exprs(item, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| dashboard_exprs(item, found)),
        _ => {}
    }
}

#[tokio::test]
async fn the_dashboard_and_alerts_query_only_metrics_the_service_exports() {
    let text = std::fs::read_to_string(repo("deploy/grafana/dashboards/hybridstore.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "hybridstore");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for panel in panels {
        assert_eq!(
            panel["datasource"]["uid"], "prometheus",
            "{}",
            panel["title"]
        );
        assert!(!panel["targets"].as_array().unwrap().is_empty());
    }
    let provisioned = std::fs::read_to_string(repo(
        "deploy/grafana/provisioning/datasources/prometheus.yml",
    ))
    .unwrap();
    assert!(provisioned.contains("uid: prometheus"));

    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let rules = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let queried: BTreeSet<String> = exprs
        .iter()
        .map(String::as_str)
        .chain(std::iter::once(rules.as_str()))
        .flat_map(metric_names)
        .collect();

    // A service that has served a little of everything.
    let app = TestApp::builder().spawn().await;
    app.put("accounts", "a", json!({"n": 1})).await;
    app.get("accounts", "a").await;
    let scraped = scrape(&app).await;
    let exported: BTreeSet<String> = scraped
        .samples
        .keys()
        .map(|key| key.split('{').next().unwrap().to_owned())
        .collect();
    let missing: Vec<_> = queried.difference(&exported).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
    assert!(queried.len() >= 15, "{queried:?}");
}

/// What an operator reads off the dashboard is right: one instance or all
/// can be picked, every query follows that choice, a down tier or process
/// shows red (not green), tables show the state now (instant queries, not
/// a range's history), and the panels an operator asked for are there.
#[test]
fn the_dashboard_picks_instances_shows_down_in_red_and_tables_the_state_now() {
    let text = std::fs::read_to_string(repo("deploy/grafana/dashboards/hybridstore.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let instance = variables
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("an instance variable");
    assert_eq!(instance["multi"], true);
    assert_eq!(instance["includeAll"], true);
    assert!(
        instance["definition"]
            .as_str()
            .unwrap()
            .starts_with("label_values(hybridstore_")
    );

    let panels = dashboard["panels"].as_array().unwrap();
    let titled = |title: &str| {
        panels
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("a {title:?} panel"))
    };
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            // Every metric selector in the query names the instance.
            // (Prometheus's own `up` too, not the `_up` ending of a name.)
            let up = expr
                .match_indices("up{")
                .filter(|(at, _)| {
                    *at == 0 || {
                        let before = expr.as_bytes()[at - 1];
                        !(before.is_ascii_alphanumeric() || before == b'_')
                    }
                })
                .count();
            let selectors = metric_names(expr).len() + up;
            assert_eq!(
                expr.matches("instance=~\"$instance\"").count(),
                selectors,
                "{}: {expr}",
                panel["title"]
            );
        }
        match panel["type"].as_str().unwrap() {
            "table" => {
                for target in panel["targets"].as_array().unwrap() {
                    assert_eq!(target["instant"], true, "{}", panel["title"]);
                    assert_eq!(target["range"], false, "{}", panel["title"]);
                }
            }
            "stat" => {
                let steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{} has thresholds", panel["title"]));
                assert!(steps.len() >= 2, "{}", panel["title"]);
            }
            _ => {}
        }
    }
    // Down is red: the base step (below 1) is red, 1 and above green.
    for title in ["Tier up", "Instances up"] {
        let steps = &titled(title)["fieldConfig"]["defaults"]["thresholds"]["steps"];
        assert_eq!(steps[0]["color"], "red", "{title}");
        assert_eq!(steps[1]["color"], "green", "{title}");
        assert_eq!(steps[1]["value"], 1, "{title}");
    }
    let up = titled("Instances up")["targets"][0]["expr"]
        .as_str()
        .unwrap();
    assert!(up.starts_with("up{job=\"hybridstore\""), "{up}");
    for (title, metric) in [
        (
            "Counter increments and reads",
            "operation=~\"increment|counter_read\"",
        ),
        (
            "Last backup (age)",
            "hybridstore_backup_last_made_timestamp_seconds",
        ),
        ("Uptime", "hybridstore_uptime_seconds"),
        ("Memory (resident)", "process_resident_memory_bytes"),
    ] {
        let expr = titled(title)["targets"][0]["expr"].as_str().unwrap();
        assert!(expr.contains(metric), "{title}: {expr}");
    }
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
}

/// The image's default run (embedded mode, as its non-root user, from its
/// working directory) has somewhere to keep its data, and nothing of a
/// local run reaches the build context. Checked on the files (no Docker
/// engine runs here): the runtime stage makes and hands its data directory
/// to the user it runs as, works there, declares it a volume and points
/// DATA_DIR and BACKUP_DIR into it; `.dockerignore` leaves out data,
/// backups, admin tokens, database files and the tokens file.
#[test]
fn the_image_keeps_its_data_in_a_volume_its_user_owns_and_builds_without_local_data() {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let runtime = dockerfile
        .rsplit_once("\nFROM ")
        .map(|(_, stage)| stage)
        .expect("a runtime stage");
    for needed in [
        "useradd --system --uid 10001",
        "chown -R hybridstore:hybridstore /var/lib/hybridstore",
        "USER hybridstore",
        "WORKDIR /var/lib/hybridstore",
        "VOLUME [\"/var/lib/hybridstore\"]",
        "DATA_DIR=/var/lib/hybridstore/data",
        "BACKUP_DIR=/var/lib/hybridstore/backups",
    ] {
        assert!(
            runtime.contains(needed),
            "the runtime stage lacks {needed:?}"
        );
    }
    let user = runtime.find("USER hybridstore").unwrap();
    let owned = runtime.find("chown -R hybridstore").unwrap();
    assert!(
        owned < user,
        "the directory is handed over before the user switch"
    );
    let ignored = std::fs::read_to_string(repo(".dockerignore")).unwrap();
    let ignored: BTreeSet<&str> = ignored.lines().map(str::trim).collect();
    for path in [
        "data",
        "backups",
        "**/admin-token",
        "*.db",
        "deploy/tokens.toml",
        ".env",
    ] {
        assert!(ignored.contains(path), ".dockerignore lacks {path}");
    }
}

/// The documentation stands alone: the contract is in the repository, and
/// every link in the Markdown files (README, ARCHITECTURE, docs/) leads to
/// a file of the repository, never outside it.
#[test]
fn the_docs_link_only_to_files_of_the_repository() {
    let mut files = vec![repo("README.md"), repo("ARCHITECTURE.md")];
    for entry in std::fs::read_dir(repo("docs")).expect("a docs directory") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    assert!(
        files.iter().any(|f| f.ends_with("docs/contract.md")),
        "the product contract is in the repository"
    );
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    assert!(readme.contains("](docs/contract.md)"), "README leads to it");
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let target = &rest[..rest.find(')').expect("a closed link")];
            let path = target.split('#').next().unwrap();
            assert!(
                !target.contains("://") && !target.starts_with("mailto:"),
                "{}: {target} leaves the repository",
                file.display()
            );
            if path.is_empty() {
                continue;
            }
            let resolved = file.parent().unwrap().join(path);
            let resolved = resolved
                .canonicalize()
                .unwrap_or_else(|_| panic!("{}: {target} does not exist", file.display()));
            assert!(
                resolved.starts_with(repo("").canonicalize().unwrap()),
                "{}: {target} is outside the repository",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "{checked} links checked");
}
