//! Load generator for `bench/counters.sh` (not a test, not a criterion
//! bench): sends increments through the HTTP API with concurrent clients and
//! prints the rate. Settings from the environment: `HYBRIDSTORE_URL`,
//! `HYBRIDSTORE_ADMIN_TOKEN`, `BENCH_INCREMENTS` (20000), `BENCH_CLIENTS`
//! (32), `BENCH_SCOPES` (100).

use std::sync::Arc;
use std::time::Instant;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let Ok(url) = std::env::var("HYBRIDSTORE_URL") else {
        eprintln!("run through bench/counters.sh (HYBRIDSTORE_URL is not set)");
        return;
    };
    let token = std::env::var("HYBRIDSTORE_ADMIN_TOKEN").unwrap_or_default();
    let total = setting("BENCH_INCREMENTS", 20_000);
    let clients = setting("BENCH_CLIENTS", 32).max(1);
    let scopes = setting("BENCH_SCOPES", 100).max(1);
    let http = reqwest::Client::new();
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (http, url, token, failures) =
                (http.clone(), url.clone(), token.clone(), failures.clone());
            tokio::spawn(async move {
                for n in (client..total).step_by(clients) {
                    let scope = format!("usage:key_{}:model:sonnet", n % scopes);
                    let body = serde_json::json!({"deltas": {
                        "requests": 1, "input_tokens": 1200, "output_tokens": 350,
                        "cost_usd": 0.0123,
                    }});
                    let ok = http
                        .post(format!("{url}/v1/counters/{scope}/increment"))
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if !ok {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("client task");
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "increments={total} clients={clients} scopes={scopes} failures={} seconds={seconds:.2} per_second={:.0}",
        failures.load(std::sync::atomic::Ordering::Relaxed),
        total as f64 / seconds
    );
}
