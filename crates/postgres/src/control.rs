//! The operators' run-time state.

use super::*;

const LOAD_CONTROL: &str = "SELECT value FROM control WHERE name = 'state'";

/// Saves the state only over an older revision.
const SAVE_CONTROL: &str = "INSERT INTO control AS c (name, revision, value, updated_at) \
    VALUES ('state', $1, $2, now()) ON CONFLICT (name) DO UPDATE \
    SET revision = EXCLUDED.revision, value = EXCLUDED.value, updated_at = now() \
    WHERE c.revision < EXCLUDED.revision RETURNING 1";

#[async_trait]
impl DurableControl for PostgresStore {
    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        let value: Option<Json<ControlState>> = sqlx::query_scalar(LOAD_CONTROL)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(value.map(|Json(state)| state))
    }

    async fn save_control(&self, state: &ControlState) -> StoreResult<bool> {
        let revision = i64::try_from(state.revision)
            .map_err(|_| StoreError::internal(Tier::Durable, "control revision out of range"))?;
        let saved = sqlx::query(SAVE_CONTROL)
            .bind(revision)
            .bind(Json(state))
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(saved.is_some())
    }
}
