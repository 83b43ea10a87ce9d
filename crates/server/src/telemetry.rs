//! Logging setup: `RUST_LOG` wins over the configured level; `pretty` or
//! `json`; to stdout and, with `log.dir` (`LOG_DIR`), also to daily files that
//! are rotated at midnight UTC and kept for `log.retention_days`.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{Builder, Rotation};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

fn format_layer<W>(format: LogFormat, writer: W, ansi: bool) -> BoxedLayer
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => layer.json().boxed(),
        LogFormat::Pretty => layer.boxed(),
    }
}

/// Installs the global subscriber (a second call is a no-op). Keep the
/// returned guard until exit: it flushes the log file.
pub fn init(config: &LogConfig) -> Result<Option<WorkerGuard>, String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let mut layers = vec![format_layer(
        config.format,
        std::io::stdout,
        std::io::stdout().is_terminal(),
    )];
    let mut guard = None;
    if let Some(dir) = &config.dir {
        let files = Builder::new()
            .rotation(Rotation::DAILY)
            .filename_prefix("hybridstore")
            .filename_suffix("log")
            .max_log_files(config.retention_days.max(1))
            .build(dir)
            .map_err(|err| format!("log.dir (LOG_DIR) {}: {err}", dir.display()))?;
        let (writer, flush) = tracing_appender::non_blocking(files);
        layers.push(format_layer(config.format, writer, false));
        guard = Some(flush);
    }
    let _ = tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init();
    Ok(guard)
}
