//! Integration tests: HTTP against the real service, backed by real PostgreSQL
//! and Redis servers started by the testkit (one pair per test binary, one
//! database and key prefix per test).

mod admin;
mod bad_input;
mod binary;
mod cli;
mod compound;
mod concurrency;
mod counters;
mod degradation;
mod deployment;
mod engine_suite;
mod faults;
mod idempotency;
mod indexes_and_ttl;
mod journal;
mod observability;
mod openapi;
mod outages;
mod records;
mod stale_cache;
mod strategies;
mod transfer;
mod typescript;
