//! The operators' run-time state: kept by the durable tier, mirrored and
//! broadcast by the cache tier.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use crate::{ControlState, StoreResult};

/// The durable tier's copy of the control state.
#[async_trait]
pub trait DurableControl: Send + Sync + 'static {
    /// The operators' run-time state, if one was ever saved.
    async fn load_control(&self) -> StoreResult<Option<ControlState>>;

    /// Saves `state` unless the stored revision is not older (another change
    /// got in first); returns whether it was saved.
    async fn save_control(&self, state: &ControlState) -> StoreResult<bool>;

    /// Takes the turn `name` for `holder` until `period` from now, unless
    /// another holder's turn has not ended yet (a holder may take its own
    /// again); returns whether `holder` has it. Scheduled work that one
    /// instance at a time should do (the periodic repair) runs in turns.
    async fn take_turn(&self, name: &str, holder: &str, period: Duration) -> StoreResult<bool>;
}

/// The cache tier's mirror of the control state, and its broadcast.
#[async_trait]
pub trait ControlChannel: Send + Sync + 'static {
    /// The mirror of the operators' run-time state.
    async fn load_control(&self) -> StoreResult<Option<ControlState>>;

    /// Updates the mirror (unless it holds a newer revision) and broadcasts
    /// `state` to every subscriber.
    async fn publish_control(&self, state: &ControlState) -> StoreResult<()>;

    /// Every state broadcast from now on, by any instance. The stream ends
    /// when the connection is lost; subscribe again.
    async fn subscribe_control(&self) -> StoreResult<BoxStream<'static, ControlState>>;
}
