//! Test harness: real PostgreSQL and Redis servers, and the service on port 0.
//!
//! Servers are real processes on free loopback ports, started once per test
//! binary ([`shared`]) or per test when a test needs to kill them
//! ([`Postgres::start`], [`Redis::start`]): from the binaries installed here,
//! or, where those are missing, in Docker containers (see [`Source`]). Each
//! test gets its own database and its own Redis key prefix, so tests run in
//! parallel without seeing each other. No mocks: what the tests talk to is
//! what production talks to.

mod app;
mod hooked;
mod process;
mod servers;
mod service;
mod wait;

pub use app::{
    ADMIN_TOKEN, API_KEYS_WRITER_TOKEN, Deployment, Production, READER_TOKEN, StoredCopy, TestApp,
    TestAppBuilder, etag_version, record_ids, spawn_app,
};
pub use hooked::HookedDurable;
pub use process::free_port;
pub use servers::{
    Postgres, Redis, RedisPersistence, SERVERS_VARIABLE, SharedServers, Source, create_database,
    shared, source,
};
pub use service::ServiceProcess;
pub use wait::{blocking, until};
