//! The operators' run-time state.

use super::*;

const LOAD_CONTROL: &str = "SELECT value FROM control WHERE name = 'state'";

/// Saves the state only over an older revision.
const SAVE_CONTROL: &str = "INSERT INTO control AS c (name, revision, value, updated_at) \
    VALUES ('state', $1, $2, now()) ON CONFLICT (name) DO UPDATE \
    SET revision = EXCLUDED.revision, value = EXCLUDED.value, updated_at = now() \
    WHERE c.revision < EXCLUDED.revision RETURNING 1";

/// A turn is a control row `turn:<name>`: its holder as the value, its end
/// as `updated_at`.
const TAKE_TURN: &str = "INSERT INTO control AS c (name, revision, value, updated_at) \
    VALUES ($1, 0, $2, now() + $3 * interval '1 millisecond') ON CONFLICT (name) DO UPDATE \
    SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at \
    WHERE c.updated_at <= now() OR c.value = EXCLUDED.value RETURNING 1";

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

    async fn take_turn(&self, name: &str, holder: &str, period: Duration) -> StoreResult<bool> {
        let millis = i64::try_from(period.as_millis()).unwrap_or(i64::MAX);
        let taken = sqlx::query(TAKE_TURN)
            .bind(format!("turn:{name}"))
            .bind(Json(holder))
            .bind(millis)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(taken.is_some())
    }
}
