//! The `hybridstore` binary: everything lives in `hybridstore-server`.

fn main() -> std::process::ExitCode {
    hybridstore_server::run_from_env()
}
