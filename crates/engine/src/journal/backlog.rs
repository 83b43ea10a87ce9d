//! Whether journaled writes of one kind may still wait to be replayed.

/// Whether journaled writes of one kind may still wait to be replayed.
///
/// Set by every journaled write, cleared by the replay loop when the journal
/// is empty, but only if no write was journaled since the loop began to look:
/// otherwise a write landing between the length check and the clearing would
/// leave the flag down with its entry pending.
#[derive(Default)]
pub(crate) struct Backlog {
    /// (writes journaled so far, may entries wait)
    state: std::sync::Mutex<(u64, bool)>,
}

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, bool)> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn pending(&self) -> bool {
        self.lock().1
    }

    pub(crate) fn mark(&self) {
        let mut state = self.lock();
        state.0 += 1;
        state.1 = true;
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.lock().0
    }

    /// Records the length seen; returns true when this cleared the flag.
    pub(crate) fn settle(&self, epoch: u64, length: u64) -> bool {
        let mut state = self.lock();
        if length > 0 {
            state.1 = true;
            false
        } else if state.0 == epoch && state.1 {
            state.1 = false;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Backlog;

    #[test]
    fn a_write_during_the_check_keeps_the_backlog_pending() {
        let backlog = Backlog::default();
        backlog.mark();
        let epoch = backlog.epoch();
        backlog.mark(); // journaled after the length was read as 0
        assert!(!backlog.settle(epoch, 0));
        assert!(backlog.pending());
        let epoch = backlog.epoch();
        assert!(backlog.settle(epoch, 0));
        assert!(!backlog.pending());
        assert!(!backlog.settle(epoch, 3));
        assert!(backlog.pending(), "a non-empty journal sets it");
    }
}
