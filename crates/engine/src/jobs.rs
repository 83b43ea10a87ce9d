//! Background jobs (sync, consistency checks) and their progress.
//!
//! Jobs belong to the instance that runs them and live in its memory: the
//! admin API answers `GET /admin/database/jobs/{id}` from there. Their effects
//! are safe to repeat (every write is version-guarded), so a job lost with its
//! instance is simply started again.

use hybridstore_api::{JobState, JobView, ProgressView};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

/// Finished jobs kept for their reports; older ones are forgotten.
const KEEP_FINISHED: usize = 100;

/// Counters a job advances as it goes (atomics: read while it runs).
#[derive(Default)]
pub struct Progress {
    pub total: AtomicU64,
    pub scanned: AtomicU64,
    pub written: AtomicU64,
    pub skipped_older: AtomicU64,
    pub skipped_pinned: AtomicU64,
    pub failed: AtomicU64,
}

impl Progress {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub struct Job {
    pub id: String,
    pub kind: &'static str,
    pub params: serde_json::Value,
    pub started_at: OffsetDateTime,
    pub progress: Progress,
    finish: Mutex<Option<Finish>>,
}

struct Finish {
    state: JobState,
    at: OffsetDateTime,
    result: Option<serde_json::Value>,
    error: Option<String>,
}

impl Job {
    pub fn finish(&self, outcome: Result<Option<serde_json::Value>, String>) {
        let (state, result, error) = match outcome {
            Ok(result) => (JobState::Succeeded, result, None),
            Err(error) => (JobState::Failed, None, Some(error)),
        };
        *self.finish.lock().unwrap_or_else(|e| e.into_inner()) = Some(Finish {
            state,
            at: OffsetDateTime::now_utc(),
            result,
            error,
        });
    }

    pub fn view(&self) -> JobView {
        let finish = self.finish.lock().unwrap_or_else(|e| e.into_inner());
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let p = &self.progress;
        JobView {
            id: self.id.clone(),
            kind: self.kind.to_owned(),
            state: finish.as_ref().map_or(JobState::Running, |f| f.state),
            params: self.params.clone(),
            started_at: self.started_at,
            finished_at: finish.as_ref().map(|f| f.at),
            progress: ProgressView {
                total: load(&p.total),
                scanned: load(&p.scanned),
                written: load(&p.written),
                skipped_older: load(&p.skipped_older),
                skipped_pinned: load(&p.skipped_pinned),
                failed: load(&p.failed),
            },
            result: finish.as_ref().and_then(|f| f.result.clone()),
            error: finish.as_ref().and_then(|f| f.error.clone()),
        }
    }

    fn finished(&self) -> bool {
        self.finish
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// The jobs of this instance, newest last.
#[derive(Default)]
pub(crate) struct Jobs {
    jobs: Mutex<VecDeque<Arc<Job>>>,
    next: AtomicU64,
}

impl Jobs {
    pub fn create(&self, kind: &'static str, params: serde_json::Value) -> Arc<Job> {
        let started_at = OffsetDateTime::now_utc();
        let number = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            id: format!("{kind}-{}-{number}", started_at.unix_timestamp()),
            kind,
            params,
            started_at,
            progress: Progress::default(),
            finish: Mutex::new(None),
        });
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.push_back(job.clone());
        while jobs.iter().filter(|job| job.finished()).count() > KEEP_FINISHED {
            if let Some(oldest) = jobs.iter().position(|job| job.finished()) {
                jobs.remove(oldest);
            }
        }
        job
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter().find(|job| job.id == id).cloned()
    }

    pub fn all(&self) -> Vec<JobView> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter().map(|job| job.view()).collect()
    }
}
