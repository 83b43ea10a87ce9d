//! The mirror of the operators' run-time state, and its broadcast.

use super::*;

#[async_trait]
impl ControlChannel for RedisStore {
    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.control())
            .query_async(&mut self.conn.clone())
            .await
            .map_err(classify)?;
        raw.map(|bytes| {
            serde_json::from_slice(&bytes)
                .map_err(|err| corrupt(format!("undecodable control state: {err}")))
        })
        .transpose()
    }

    async fn publish_control(&self, state: &ControlState) -> StoreResult<()> {
        let payload =
            serde_json::to_vec(state).map_err(|err| StoreError::internal(Tier::Cache, err))?;
        // The mirror only moves forward; the broadcast goes out either way
        // (receivers ignore revisions they have).
        if self
            .load_control()
            .await?
            .is_none_or(|held| held.revision < state.revision)
        {
            redis::cmd("SET")
                .arg(self.keys.control())
                .arg(&payload)
                .query_async::<()>(&mut self.conn.clone())
                .await
                .map_err(classify)?;
        }
        redis::cmd("PUBLISH")
            .arg(self.keys.control_channel())
            .arg(&payload)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(classify)
    }

    async fn subscribe_control(&self) -> StoreResult<BoxStream<'static, ControlState>> {
        let connect = self.client.get_async_pubsub();
        let mut pubsub = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| StoreError::unavailable(Tier::Cache, "pub/sub connect timed out"))?
            .map_err(classify)?;
        pubsub
            .subscribe(self.keys.control_channel())
            .await
            .map_err(classify)?;
        let states = pubsub.into_on_message().filter_map(|message| async move {
            match serde_json::from_slice(message.get_payload_bytes()) {
                Ok(state) => Some(state),
                Err(err) => {
                    tracing::warn!(error = %err, "ignored an undecodable control message");
                    None
                }
            }
        });
        Ok(states.boxed())
    }
}
