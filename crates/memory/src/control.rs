//! The mirror of the operators' run-time state, and its broadcast.

use super::*;

#[async_trait]
impl ControlChannel for MemoryCache {
    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        Ok(self.lock().control.clone())
    }

    async fn publish_control(&self, control: &ControlState) -> StoreResult<()> {
        {
            let mut state = self.lock();
            if state
                .control
                .as_ref()
                .is_none_or(|held| held.revision < control.revision)
            {
                state.control = Some(control.clone());
            }
        }
        // No subscriber is fine: nobody is listening yet.
        let _ = self.control.send(control.clone());
        Ok(())
    }

    async fn subscribe_control(&self) -> StoreResult<BoxStream<'static, ControlState>> {
        let receiver = self.control.subscribe();
        let states = futures_util::stream::unfold(receiver, |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(state) => return Some((state, receiver)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(states.boxed())
    }
}
