//! The operators' run-time state.

use super::*;

const SAVE_CONTROL: &str = "INSERT INTO control (name, revision, value, updated_at) \
    VALUES ('state', ?1, ?2, ?3) ON CONFLICT (name) DO UPDATE \
    SET revision = excluded.revision, value = excluded.value, updated_at = excluded.updated_at \
    WHERE control.revision < excluded.revision";

/// A turn is a control row `turn:<name>`: its holder as the value, its end
/// (µs) as `updated_at`.
const TAKE_TURN: &str = "INSERT INTO control (name, revision, value, updated_at) \
    VALUES (?1, 0, ?2, ?3) ON CONFLICT (name) DO UPDATE \
    SET value = excluded.value, updated_at = excluded.updated_at \
    WHERE control.updated_at <= ?4 OR control.value = excluded.value";

#[async_trait]
impl DurableControl for SqliteStore {
    async fn load_control(&self) -> StoreResult<Option<ControlState>> {
        let value: Option<String> = self
            .read(|tx| {
                tx.query_row(
                    "SELECT value FROM control WHERE name = 'state'",
                    [],
                    |row| row.get(0),
                )
                .optional()
                .map_err(classify)
            })
            .await?;
        value
            .map(|text| {
                serde_json::from_str(&text)
                    .map_err(|err| corrupt(format!("undecodable control state: {err}")))
            })
            .transpose()
    }

    async fn save_control(&self, state: &ControlState) -> StoreResult<bool> {
        let revision =
            i64::try_from(state.revision).map_err(|_| corrupt("control revision out of range"))?;
        let value =
            serde_json::to_string(state).map_err(|err| StoreError::internal(Tier::Durable, err))?;
        let now = Micros::of(OffsetDateTime::now_utc()).get();
        self.write(move |tx| {
            tx.execute(SAVE_CONTROL, params![revision, value, now])
                .map(|changed| changed > 0)
                .map_err(classify)
        })
        .await
    }

    async fn take_turn(&self, name: &str, holder: &str, period: Duration) -> StoreResult<bool> {
        let name = format!("turn:{name}");
        let holder = holder.to_owned();
        let now = OffsetDateTime::now_utc();
        let (ends, now) = (Micros::of(now + period).get(), Micros::of(now).get());
        self.write(move |tx| {
            tx.execute(TAKE_TURN, params![name, holder, ends, now])
                .map(|changed| changed > 0)
                .map_err(classify)
        })
        .await
    }
}
