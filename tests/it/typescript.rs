//! The TypeScript client (`clients/typescript`) against the real service in
//! both modes: its own tests (`node --test`) run against an embedded and a
//! production server. Its types are generated from `openapi.json` there,
//! which must be the document the service serves.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hybridstore_testkit::{ADMIN_TOKEN, TestApp, blocking};
use serde_json::Value;
use tokio::sync::Mutex;

/// One build at a time (both tests of this file use it).
static BUILT: Mutex<bool> = Mutex::const_new(false);

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/typescript")
}

fn shown(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Compiles the client and its tests once (`npm run build`: generate the
/// types from `openapi.json`, then `tsc`).
async fn build() {
    let mut built = BUILT.lock().await;
    if *built {
        return;
    }
    let dir = client_dir();
    assert!(
        dir.join("node_modules").is_dir(),
        "clients/typescript/node_modules is missing: bash scripts/test-tools.sh installs Node and runs npm ci there"
    );
    let output = blocking(move || {
        Command::new("npm")
            .args(["run", "--silent", "build"])
            .current_dir(dir)
            .output()
            .expect("npm (Node.js) is installed: bash scripts/test-tools.sh")
    })
    .await;
    assert!(
        output.status.success(),
        "npm run build:\n{}",
        shown(&output)
    );
    *built = true;
}

async fn client_tests_pass_against(app: &TestApp, mode: &str) {
    build().await;
    let (dir, url) = (client_dir(), app.url(""));
    let output = blocking(move || {
        Command::new("node")
            .args(["--test", "dist/test/"])
            .env("HYBRIDSTORE_URL", url.trim_end_matches('/'))
            .env("HYBRIDSTORE_TOKEN", ADMIN_TOKEN)
            .current_dir(dir)
            .output()
            .expect("node runs")
    })
    .await;
    let text = shown(&output);
    assert!(output.status.success(), "{mode}:\n{text}");
    assert!(text.contains("# pass 6"), "{mode}: every test ran:\n{text}");
}

#[tokio::test]
async fn the_typescript_client_passes_its_tests_against_both_modes() {
    let embedded = TestApp::builder().embedded().spawn().await;
    client_tests_pass_against(&embedded, "embedded").await;
    let production = TestApp::builder().spawn().await;
    client_tests_pass_against(&production, "production").await;
}

/// The client's types come from the document the service serves (with the
/// shipped collections): regenerate `openapi.json` when the API changes.
#[tokio::test]
async fn the_clients_document_is_the_one_the_service_serves() {
    let app = TestApp::builder().embedded().spawn().await;
    let served = app.open_json("/openapi.json").await;
    let kept: Value = serde_json::from_slice(
        &std::fs::read(client_dir().join("openapi.json")).expect("clients/typescript/openapi.json"),
    )
    .unwrap();
    assert!(
        kept == served,
        "clients/typescript/openapi.json is not what the service serves: \
         curl -s http://127.0.0.1:8080/openapi.json > clients/typescript/openapi.json \
         (from a server with the shipped config)"
    );
}
