//! The hybridstore service: configuration, HTTP API and the wiring between them.
//!
//! `main.rs` only calls [`run_from_env`]; tests build a server with
//! [`ServerBuilder`] on port 0 and talk to it over HTTP.

mod app;
pub mod auth;
pub mod config;
pub mod http;
pub mod metrics;
pub mod scope;
pub mod telemetry;

use std::process::ExitCode;

pub use app::{Server, ServerBuilder, StartError};
pub use config::Config;

/// Loads the configuration from files and environment, and serves until
/// SIGINT / SIGTERM. Exit code 2 for a configuration error, 1 for a failed start.
pub fn run_from_env() -> ExitCode {
    return_large_buffers();
    let config = match Config::load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("hybridstore: {err}");
            return ExitCode::from(2);
        }
    };
    // Held until the end of this function: it flushes the log file.
    let _log_file = match telemetry::init(&config.log) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("hybridstore: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("hybridstore: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let server = match ServerBuilder::new(config).bind().await {
            Ok(server) => server,
            Err(err) => {
                tracing::error!(error = %err, "hybridstore failed to start");
                return ExitCode::FAILURE;
            }
        };
        match server.run(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %err, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

/// Has the allocator give large buffers (request bodies, records, list
/// pages: 128 KiB and up) back to the system when they are freed. glibc
/// otherwise raises its mmap threshold after the first such free and serves
/// later large buffers from its heaps, where freed memory stays resident: a
/// flood of 1 MiB writes kept several hundred MiB after it had passed.
fn return_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called before any other thread exists; mallopt only changes
    // allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
