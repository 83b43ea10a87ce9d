//! The real container engine: Docker through the `testcontainers` crate
//! (feature `containers`; nothing here is built otherwise).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use testcontainers::core::{ExecCommand, IntoContainerPort};
use testcontainers::runners::SyncRunner;
use testcontainers::{Container, GenericImage, ImageExt};

use super::container::{ContainerEngine, ContainerSpec};

/// The containers this test binary runs, by id.
#[derive(Default)]
pub struct Testcontainers {
    containers: Mutex<HashMap<String, Container<GenericImage>>>,
}

/// Runs a future that finishes without waiting: the blocking container's
/// `pause` and `unpause` are `async` in name only (they block on the
/// container's own runtime inside).
fn at_once<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => unreachable!("a blocking call returned pending"),
    }
}

impl Testcontainers {
    fn with<T>(
        &self,
        id: &str,
        call: impl FnOnce(&Container<GenericImage>) -> Result<T, testcontainers::TestcontainersError>,
    ) -> Result<T, String> {
        let containers = self.containers.lock().expect("containers lock");
        let container = containers
            .get(id)
            .ok_or_else(|| format!("no container {id}"))?;
        call(container).map_err(|err| err.to_string())
    }
}

impl ContainerEngine for Testcontainers {
    fn run(&self, spec: &ContainerSpec) -> Result<String, String> {
        let mut request = GenericImage::new(spec.image, spec.tag)
            .with_exposed_port(spec.container_port.tcp())
            .with_mapped_port(spec.host_port, spec.container_port.tcp())
            .with_cmd(spec.cmd.clone());
        for (name, value) in &spec.env {
            request = request.with_env_var(name, value);
        }
        let container = request.start().map_err(|err| err.to_string())?;
        let id = container.id().to_owned();
        self.containers
            .lock()
            .expect("containers lock")
            .insert(id.clone(), container);
        Ok(id)
    }

    fn stop(&self, id: &str) -> Result<(), String> {
        self.with(id, |c| c.stop())
    }

    fn kill(&self, id: &str) -> Result<(), String> {
        // No grace period: the engine kills at once.
        self.with(id, |c| c.stop_with_timeout(Some(0)))
    }

    fn start(&self, id: &str) -> Result<(), String> {
        self.with(id, |c| c.start())
    }

    fn pause(&self, id: &str) -> Result<(), String> {
        self.with(id, |c| at_once(c.pause()))
    }

    fn unpause(&self, id: &str) -> Result<(), String> {
        self.with(id, |c| at_once(c.unpause()))
    }

    fn exec(&self, id: &str, command: &[&str]) -> Result<(), String> {
        self.with(id, |c| {
            c.exec(ExecCommand::new(command.iter().copied())).map(drop)
        })
    }

    fn remove(&self, id: &str) {
        let removed = self.containers.lock().expect("containers lock").remove(id);
        if let Some(container) = removed {
            let _ = container.rm();
        }
    }
}
