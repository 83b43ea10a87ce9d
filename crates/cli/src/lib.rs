//! The `hybridstore` command line.
//!
//! `hybridstore` (or `hybridstore serve`) runs the server; every other
//! subcommand talks to a running server's admin API, so the CLI works the same
//! against a local process or a container, and needs nothing but the URL and
//! the admin token. Output is for humans by default and JSON with `--json`.
//!
//! Exit codes: 0 success; 1 the answer is bad news (unhealthy, inconsistent,
//! a failed job); 2 wrong usage; 3 the server could not be asked or refused
//! the request (unreachable, 401/403, 409 ...).

mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use hybridstore_api::{
    ConsistencyReport, HealthReport, JobState, JobView, MetricsReport, Overall, ProblemDocument,
    StatusReport, SwitchOutcome,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(
    name = "hybridstore",
    version,
    about = "Hybrid Redis + PostgreSQL data service"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub remote: Remote,
}

/// How to reach a running server.
#[derive(Args, Debug, Clone, Default)]
pub struct Remote {
    /// Base URL of the server (default: http://127.0.0.1:$PORT, PORT=8080).
    #[arg(long, env = "HYBRIDSTORE_URL", global = true)]
    pub url: Option<String>,
    /// The admin token (or ADMIN_TOKEN).
    #[arg(
        long,
        env = "HYBRIDSTORE_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Print the server's JSON answer instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Liveness probe for container healthchecks: exit 0 when `GET /health`
    /// answers 200 (no token needed).
    Ping,
    /// Tier health; exits 1 unless both tiers are healthy.
    Health {
        /// Also show errors, since when, and degradation counts.
        #[arg(long)]
        verbose: bool,
    },
    /// Strategy, tiers, journal backlog, cache generation, instance.
    Status,
    /// Operation counts, cache hit rate, errors, per-tier latency.
    Metrics {
        /// Refresh in place until interrupted.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Copy records from one tier to the other (version-guarded).
    Sync {
        #[arg(long)]
        source: TierName,
        #[arg(long)]
        target: TierName,
        /// Let an older version overwrite a newer one.
        #[arg(long)]
        force: bool,
        /// Only this collection.
        #[arg(long)]
        collection: Option<String>,
    },
    /// Compare the tiers record by record; exits 1 when they differ.
    CheckConsistency {
        /// Make the tiers agree (the newer version wins).
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        collection: Option<String>,
    },
    /// Switch the service-wide strategy on every instance.
    SwitchStrategy {
        /// dual-write, cache-first, database-first, redis-only, postgres-only;
        /// with --collection also `service` (back to what it declares or follows)
        name: String,
        /// Allow a switch that changes which tier holds the truth.
        #[arg(long)]
        force: bool,
        /// Switch this collection alone.
        #[arg(long)]
        collection: Option<String>,
    },
    /// Write every record and counter as NDJSON (to stdout, or a file).
    Export {
        /// Write here (atomically) instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Gzip the file (also when its name ends in .gz).
        #[arg(long)]
        gzip: bool,
    },
    /// Upsert an export's records and counters (version-guarded, idempotent).
    Import {
        /// An export, plain or gzipped (`-`: standard input).
        file: PathBuf,
        /// Overwrite newer versions and counter values already held.
        #[arg(long)]
        force: bool,
    },
    /// Create, verify and restore backups.
    Backup {
        #[command(subcommand)]
        action: BackupAction,
    },
    /// Client tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Import an MCP hub's mcp_settings.json (mcpServers, users, groups,
    /// systemConfig) into mcp_servers, users, groups and settings.
    ImportMcphub {
        file: PathBuf,
        /// Only report what would change.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BackupAction {
    /// Export into DIR as a gzipped file plus a manifest (counts, sha256).
    Create {
        #[arg(long, env = "BACKUP_DIR", default_value = "./backups")]
        dir: PathBuf,
        /// Then keep only the newest N backups in DIR.
        #[arg(long, env = "BACKUP_KEEP")]
        keep: Option<usize>,
    },
    /// Check a backup (manifest or data file): size, sha256, every line, counts.
    Verify { file: PathBuf },
    /// Verify a backup, then import it.
    Restore {
        file: PathBuf,
        /// Overwrite newer versions and counter values already held.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenAction {
    /// Print a new strong token and the config entry that grants it (for
    /// the tokens file, TOKENS_FILE, or a config file); nothing is sent to
    /// a server, and the server takes it at its next start.
    New {
        /// Who uses it (shown in logs as the caller).
        #[arg(long)]
        name: String,
        /// read:<collection|*>, write:<collection|*> or counters; repeat it.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
}

/// The config entry of a new token, as TOML.
pub fn token_entry(name: &str, scopes: &[String]) -> String {
    let quoted = |text: &str| serde_json::Value::from(text).to_string();
    let scopes: Vec<String> = scopes.iter().map(|s| quoted(s)).collect();
    format!(
        "[[tokens]]\nname = {}\ntoken = {}\nscopes = [{}]\n",
        quoted(name),
        quoted(&hybridstore_core::new_token()),
        scopes.join(", ")
    )
}

/// A tier by its role, or by the name of a backend that plays it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TierName {
    /// The durable tier (`postgres`, or `sqlite` in embedded mode).
    #[value(alias = "postgres", alias = "sqlite")]
    Durable,
    /// The cache tier (`redis`, or `memory` in embedded mode).
    #[value(alias = "redis", alias = "memory")]
    Cache,
}

/// A failure of the command itself (exit code 3).
struct Failure {
    message: String,
    /// 3: the server could not be reached or refused; 1: something here
    /// (a file that cannot be read or written).
    code: u8,
}

impl Failure {
    fn remote(message: String) -> Self {
        Self { message, code: 3 }
    }

    fn local(message: String) -> Self {
        Self { message, code: 1 }
    }
}

/// An error with its causes, down to the one that says what happened
/// ("Connection refused"), which a request error's own text leaves out.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let said = inner.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = inner.source();
    }
    text
}

type Outcome = Result<ExitCode, Failure>;

/// Parses the command line (exits on `--help` or wrong usage).
pub fn parse() -> Cli {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|first| first == "serve") {
        // The client flags are global to the client subcommands; `serve`
        // takes none of them (its settings come from the environment and
        // config files), so its help offers none and a flag is an error.
        clap::Command::new("serve")
            .bin_name("hybridstore serve")
            .about(
                "Run the server (the default). Configured by config/default.toml, \
                 config/$HYBRIDSTORE_ENV.toml and the environment (README, \"Configuration\")",
            )
            .get_matches_from(&args[1..]);
        return Cli {
            command: Some(Command::Serve),
            remote: Remote::default(),
        };
    }
    Cli::parse()
}

/// Runs an admin subcommand against a server.
pub fn run(command: Command, remote: Remote) -> ExitCode {
    // Local commands: no server, no runtime.
    if let Command::Token {
        action: TokenAction::New { name, scopes },
    } = &command
    {
        print!("{}", token_entry(name, scopes));
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("hybridstore: cannot start the async runtime: {err}");
            return ExitCode::from(3);
        }
    };
    let client = Client::new(remote);
    match runtime.block_on(client.run(command)) {
        Ok(code) => code,
        Err(Failure { message, code }) => {
            eprintln!("hybridstore: {message}");
            ExitCode::from(code)
        }
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    /// Where the token came from, or where it was looked for: said with a
    /// 401, which otherwise leaves the operator guessing.
    token_source: String,
    json: bool,
}

impl Client {
    fn new(remote: Remote) -> Self {
        let base = remote.url.unwrap_or_else(|| {
            let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
            format!("http://127.0.0.1:{port}")
        });
        // An embedded server started without ADMIN_TOKEN keeps the one it
        // made in its data directory.
        let kept = PathBuf::from(std::env::var("DATA_DIR").unwrap_or_else(|_| "./data".into()))
            .join("admin-token");
        let kept = std::path::absolute(&kept).unwrap_or(kept);
        let (token, token_source) = if let Some(token) = remote.admin_token {
            (
                Some(token),
                "the token of --admin-token / HYBRIDSTORE_ADMIN_TOKEN".to_owned(),
            )
        } else if let Ok(token) = std::env::var("ADMIN_TOKEN") {
            (Some(token), "the token of ADMIN_TOKEN".to_owned())
        } else if let Ok(token) = std::fs::read_to_string(&kept) {
            (
                Some(token.trim().to_owned()),
                format!("the token in {}", kept.display()),
            )
        } else {
            (
                None,
                format!(
                    "no token: none given (--admin-token, HYBRIDSTORE_ADMIN_TOKEN, ADMIN_TOKEN) and none in {} (run from the server's directory, or set DATA_DIR)",
                    kept.display()
                ),
            )
        };
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(600))
                .build()
                .expect("a default HTTP client builds"),
            base: base.trim_end_matches('/').to_owned(),
            token,
            token_source,
            json: remote.json,
        }
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request; answers with the status and the JSON body.
    async fn call(&self, method: reqwest::Method, path: &str) -> Result<(u16, Value), Failure> {
        self.call_with(method, path, None).await
    }

    /// [`Self::call`] with a JSON body.
    async fn call_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self.authorized(self.http.request(method, &url));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|err| Failure::remote(format!("cannot reach {url}: {}", with_causes(&err))))?;
        let status = response.status().as_u16();
        self.refused_token(status)?;
        let body = response.text().await.unwrap_or_default();
        let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        Ok((status, value))
    }

    /// A 401 says which token was sent, or where none was found.
    fn refused_token(&self, status: u16) -> Result<(), Failure> {
        if status == 401 {
            return Err(Failure::remote(format!(
                "the server answered 401 unauthorized to {}",
                self.token_source
            )));
        }
        Ok(())
    }

    /// A call that must succeed (2xx); a problem document becomes the message.
    async fn expect(&self, method: reqwest::Method, path: &str) -> Result<Value, Failure> {
        self.expect_call(method, path, None).await
    }

    /// [`Self::expect`] with a JSON body.
    async fn expect_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<Value, Failure> {
        self.expect_call(method, path, Some(body)).await
    }

    async fn expect_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let (status, body) = self.call_with(method, path, body).await?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        Err(refusal(status, body))
    }

    /// A call that must succeed, its answer read as the type the server
    /// sent (`hybridstore_api`): the same struct on both sides.
    async fn fetch<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<T, Failure> {
        let body = self.expect(method, path).await?;
        decode(path, body)
    }

    fn print_json(&self, value: &impl serde::Serialize) {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    }

    async fn run(&self, command: Command) -> Outcome {
        match command {
            Command::Serve => unreachable!("serve is handled by the binary"),
            Command::Token { .. } => unreachable!("a local command, handled by run"),
            Command::Ping => self.ping().await,
            Command::Health { verbose } => self.health(verbose).await,
            Command::Status => self.status().await,
            Command::Metrics { watch, interval } => self.metrics(watch, interval).await,
            Command::Sync {
                source,
                target,
                force,
                collection,
            } => self.sync(source, target, force, collection).await,
            Command::CheckConsistency { repair, collection } => {
                self.check(repair, collection).await
            }
            Command::SwitchStrategy {
                name,
                force,
                collection,
            } => self.switch(&name, force, collection).await,
            Command::Export { output, gzip } => self.export(output, gzip).await,
            Command::Import { file, force } => self.import(&file, force).await,
            Command::Backup { action } => match action {
                BackupAction::Create { dir, keep } => self.backup_create(&dir, keep).await,
                BackupAction::Verify { file } => self.backup_verify(&file),
                BackupAction::Restore { file, force } => self.backup_restore(&file, force).await,
            },
            Command::ImportMcphub { file, dry_run } => self.import_mcphub(&file, dry_run).await,
        }
    }

    async fn ping(&self) -> Outcome {
        let answer = self
            .http
            .get(format!("{}/health", self.base))
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        Ok(match answer {
            Ok(response) if response.status().is_success() => ExitCode::SUCCESS,
            _ => ExitCode::from(1),
        })
    }

    async fn health(&self, verbose: bool) -> Outcome {
        let path = "/admin/database/health";
        // 503 (both tiers down) is an answer here, not a failure.
        let (status, body) = self.call(reqwest::Method::GET, path).await?;
        if status != 200 && status != 503 {
            return Err(refusal(status, body));
        }
        let report: HealthReport = decode(path, body)?;
        if self.json {
            self.print_json(&report);
        } else {
            println!("{}", report.status.as_str());
            for (name, tier) in &report.tiers {
                let probe = tier
                    .probe_latency_ms
                    .map(|ms| format!(", probe {ms:.1} ms"))
                    .unwrap_or_default();
                println!(
                    "  {name:<8} {:<9} {}{probe}",
                    tier.backend,
                    tier.state.as_str()
                );
                if verbose {
                    println!(
                        "           since {}, {} degradation(s), {} consecutive failure(s)",
                        rfc3339(tier.since),
                        tier.degradations,
                        tier.consecutive_failures
                    );
                    if let Some(error) = &tier.last_error {
                        println!("           last error: {error}");
                    }
                }
            }
        }
        Ok(if report.status == Overall::Healthy {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    }

    async fn status(&self) -> Outcome {
        let report: StatusReport = self
            .fetch(reqwest::Method::GET, "/admin/database/status")
            .await?;
        if self.json {
            self.print_json(&report);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "instance   {} (version {}, up {} s)",
            report.instance_id, report.version, report.uptime_secs
        );
        println!("status     {}", report.status.as_str());
        let strategy = &report.strategy;
        print!(
            "strategy   {} (configured {})",
            strategy.service, strategy.configured
        );
        match &strategy.switched {
            Some(switched) => println!(", switched at {} by {}", rfc3339(switched.at), switched.by),
            None => println!(),
        }
        for (name, tier) in &report.tiers {
            println!(
                "tier       {name} ({}): {}",
                tier.backend,
                tier.state.as_str()
            );
        }
        match &report.journal_backlog {
            Some(backlog) => println!(
                "journal    write-behind {}, outage {}, counters {}, set aside {}",
                backlog.write_behind, backlog.outage, backlog.counters, backlog.dead_letters
            ),
            None => println!("journal    unknown (the cache is unavailable)"),
        }
        println!("cache gen  {}", report.cache_generation);
        for collection in &report.collections {
            let reason = [&collection.reason, &collection.note]
                .into_iter()
                .flatten()
                .map(|r| format!(" ({r})"))
                .collect::<String>();
            println!(
                "collection {:<20} {:<15} now {}{reason}",
                collection.name,
                collection.strategy.to_string(),
                collection.effective
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn metrics(&self, watch: bool, interval: u64) -> Outcome {
        loop {
            let report: MetricsReport = self
                .fetch(reqwest::Method::GET, "/admin/database/metrics")
                .await?;
            if watch && !self.json && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                // Clear the screen and go home: refresh in place (into a
                // pipe or a file, one report after the other instead).
                print!("\x1b[2J\x1b[H");
            }
            if self.json {
                self.print_json(&report);
            } else {
                print_metrics(&report);
            }
            if !watch {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::time::sleep(Duration::from_secs(interval.max(1))).await;
        }
    }

    async fn sync(
        &self,
        source: TierName,
        target: TierName,
        force: bool,
        collection: Option<String>,
    ) -> Outcome {
        let direction = match (source, target) {
            (TierName::Cache, TierName::Durable) => "redis-to-postgres",
            (TierName::Durable, TierName::Cache) => "postgres-to-redis",
            _ => {
                eprintln!("hybridstore: --source and --target must be different tiers");
                return Ok(ExitCode::from(2));
            }
        };
        let path = format!(
            "/admin/database/sync/{direction}{}",
            query(&[
                ("force", force.then(|| "true".to_owned())),
                ("collection", collection)
            ])
        );
        let job: JobView = self.fetch(reqwest::Method::POST, &path).await?;
        let job = self.follow(job).await?;
        if self.json {
            self.print_json(&job);
        } else {
            let p = &job.progress;
            println!(
                "sync {direction} {}: scanned {}, written {}, skipped (not newer) {}, skipped (pinned by the journal) {}, failed {}",
                job.state.as_str(),
                p.scanned,
                p.written,
                p.skipped_older,
                p.skipped_pinned,
                p.failed
            );
            if let Some(error) = &job.error {
                println!("error: {error}");
            }
        }
        Ok(job_exit(&job))
    }

    async fn check(&self, repair: bool, collection: Option<String>) -> Outcome {
        let path = format!(
            "/admin/database/consistency-check{}",
            query(&[
                ("repair", repair.then(|| "true".to_owned())),
                ("collection", collection)
            ])
        );
        let job: JobView = self.fetch(reqwest::Method::POST, &path).await?;
        let job = self.follow(job).await?;
        if job.state != JobState::Succeeded {
            let error = job.error.as_deref().unwrap_or("?");
            eprintln!("hybridstore: the check failed: {error}");
            return Ok(ExitCode::from(1));
        }
        let report: ConsistencyReport = decode(&path, job.result.unwrap_or(Value::Null))?;
        if self.json {
            self.print_json(&report);
        } else {
            print_report(&report);
        }
        Ok(if report.consistent {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    }

    async fn switch(&self, name: &str, force: bool, collection: Option<String>) -> Outcome {
        let force = query(&[("force", force.then(|| "true".to_owned()))]);
        let path = match &collection {
            Some(collection) => {
                format!("/admin/database/collections/{collection}/strategy/{name}{force}")
            }
            None => format!("/admin/database/strategy/{name}{force}"),
        };
        let outcome: SwitchOutcome = self.fetch(reqwest::Method::POST, &path).await?;
        if self.json {
            self.print_json(&outcome);
        } else if outcome.changed {
            let of = collection.map(|c| format!(" of {c}")).unwrap_or_default();
            println!(
                "strategy{of} {} -> {} (revision {}{})",
                outcome.previous,
                outcome.strategy,
                outcome.revision,
                if outcome.cache_flushed {
                    ", cache copies dropped"
                } else {
                    ""
                }
            );
        } else {
            println!("strategy already {}", outcome.strategy);
        }
        if !self.json && !outcome.held_back.is_empty() {
            println!(
                "kept on dual_write (unique indexes, which only the durable tier enforces): {}",
                outcome.held_back.join(", ")
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Polls a job to its end, with a progress bar on a terminal.
    async fn follow(&self, job: JobView) -> Result<JobView, Failure> {
        let id = job.id.clone();
        let bar = if self.json {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::new(0);
            bar.set_style(counting_style("records"));
            bar.set_message(job.kind.replace('_', " "));
            bar
        };
        let started = Instant::now();
        let mut current = job;
        let mut sized = false;
        loop {
            let (total, scanned) = (current.progress.total, current.progress.scanned);
            // A bar only once the total is known: an empty one at 0/0
            // would show as full.
            if total > 0 && !sized {
                sized = true;
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {msg} [{bar:30}] {pos}/{len} records ({rate}, {elapsed})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .with_key("rate", whole_rate)
                    .progress_chars("=> "),
                );
            }
            bar.set_length(total.max(scanned));
            bar.set_position(scanned);
            if current.state != JobState::Running {
                bar.finish_and_clear();
                if !self.json {
                    let secs = started.elapsed().as_secs_f64();
                    eprintln!(
                        "{scanned} records in {secs:.1} s ({:.0} records/s)",
                        scanned as f64 / secs.max(1e-3)
                    );
                }
                return Ok(current);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            current = self
                .fetch(reqwest::Method::GET, &format!("/admin/database/jobs/{id}"))
                .await?;
        }
    }
}

/// The rate of a progress bar in whole units per second (`17,489/s`).
fn whole_rate(state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write) {
    let _ = write!(out, "{}/s", grouped(state.per_sec().round() as u64));
}

fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A spinner that counts what went by, for work of unknown size.
fn counting_style(unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{spinner}} {{msg}} {{pos}} {unit} ({{rate}}, {{elapsed}})"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_spinner())
    .with_key("rate", whole_rate)
}

/// A counter on standard error while an export streams in, when it is a
/// terminal (hidden otherwise, and with --json).
pub(crate) fn export_progress(json: bool, what: &str) -> ProgressBar {
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(counting_style("lines"));
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A bar over the bytes of an upload on standard error, when it is a
/// terminal (hidden otherwise, and with --json).
pub(crate) fn upload_progress(json: bool, total: u64) -> ProgressBar {
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {elapsed})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("importing");
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The upload is done: a spinner while the server checks and applies (no
/// rate that would only decay).
pub(crate) fn waiting_on_server(bar: &ProgressBar, total: u64) {
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(format!(
        "sent {}; the server checks every line, then applies",
        indicatif::HumanBytes(total)
    ));
}

/// A refusal, said with the problem document's code and detail (or the
/// body as it came, from something that is not this service).
pub(crate) fn refusal(status: u16, body: Value) -> Failure {
    let said = match serde_json::from_value::<ProblemDocument>(body.clone()) {
        Ok(problem) => format!("{}: {}", problem.code, problem.detail),
        Err(_) => match body {
            Value::String(text) => text,
            other => other.to_string(),
        },
    };
    Failure::remote(format!("the server answered {status} {said}"))
}

/// An answer read as the type the server sent.
fn decode<T: DeserializeOwned>(path: &str, body: Value) -> Result<T, Failure> {
    serde_json::from_value(body).map_err(|err| {
        Failure::remote(format!(
            "the server's answer to {path} is not what this CLI reads ({err}): are they the same version?"
        ))
    })
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}

fn job_exit(job: &JobView) -> ExitCode {
    if job.state == JobState::Succeeded && job.progress.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `?a=1&b=2` from the parameters that are set (values are plain words).
fn query(params: &[(&str, Option<String>)]) -> String {
    let set: Vec<String> = params
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={v}")))
        .collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("?{}", set.join("&"))
    }
}

fn print_metrics(report: &MetricsReport) {
    println!(
        "requests {}   error rate {:.2}%   cache hit rate {:.1}% ({} hits, {} misses)   degradations {}",
        report.requests,
        report.error_rate * 100.0,
        report.cache_hit_rate * 100.0,
        report.cache_hits,
        report.cache_misses,
        report.degradations
    );
    // Wide enough for the longest operation name (`counter_read`).
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "operation", "ok", "rejected", "failed", "p50 ms", "p95 ms", "p99 ms"
    );
    for (name, op) in &report.operations {
        let latency = &op.latency;
        println!(
            "{name:<12} {:>9} {:>9} {:>9} {:>9.2} {:>9.2} {:>9.2}",
            op.ok, op.rejected, op.failed, latency.p50_ms, latency.p95_ms, latency.p99_ms
        );
    }
    // Calls made to serve requests; the service's own background work
    // (replay polling, control sync, jobs) in its own column.
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "tier", "calls", "failures", "p50 ms", "p95 ms", "p99 ms", "background"
    );
    for (name, tier) in &report.tiers {
        let latency = &tier.latency;
        println!(
            "{name:<12} {:>9} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>10}",
            tier.calls,
            tier.failures,
            latency.p50_ms,
            latency.p95_ms,
            latency.p99_ms,
            tier.background_calls
        );
    }
}

fn print_report(report: &ConsistencyReport) {
    for collection in &report.collections {
        println!(
            "{} ({}): {} in the durable tier ({}), {} in the cache ({})",
            collection.collection,
            collection.strategy,
            collection.scanned_postgres,
            report.durable_backend,
            collection.scanned_redis,
            report.cache_backend
        );
        if collection.differences.is_empty() {
            println!("  no differences");
        }
        for (class, found) in &collection.differences {
            println!(
                "  {:<20} {:>7} (repaired {}) e.g. {}",
                class.as_str(),
                found.count,
                found.repaired,
                found.sample_ids.join(", ")
            );
        }
    }
    println!(
        "{}",
        if report.consistent {
            "consistent"
        } else {
            "INCONSISTENT"
        }
    );
}
