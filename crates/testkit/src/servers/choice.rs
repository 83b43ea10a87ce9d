//! Which servers the tests run on: local binaries (the default, and what CI
//! uses), else containers when a Docker engine answers, else a message that
//! names both ways. `HYBRIDSTORE_TEST_SERVERS=local|containers` forces one.
//!
//! Whether a Docker engine answers is asked with the standard library alone
//! (`GET /_ping` on its socket), so a build without the `containers`
//! feature can still say so at once.

use std::io::{Read, Write};
use std::time::Duration;

/// The variable that forces a way.
pub const SERVERS_VARIABLE: &str = "HYBRIDSTORE_TEST_SERVERS";

/// The way the tests get their servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Local,
    Containers,
}

/// What this machine offers, as far as the choice is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// `initdb`/`postgres` and `redis-server` are installed.
    pub local_binaries: bool,
    /// The testkit was built with the `containers` feature.
    pub container_support: bool,
    /// `Ok`: a Docker engine answered at this address; `Err`: why not.
    pub docker: Result<String, String>,
}

const BOTH_WAYS: &str = "install the server binaries (Debian: apt-get install postgresql \
    redis-server; or set HYBRIDSTORE_TEST_PG_BIN), or run a Docker engine and test with \
    `HYBRIDSTORE_TEST_SERVERS=containers cargo test --features containers`";

/// The choice, from the variable's value and the machine's facts.
pub fn choose(wanted: Option<&str>, facts: &Facts) -> Result<Source, String> {
    let containers = || -> Result<Source, String> {
        let address = match &facts.docker {
            Ok(address) => address,
            Err(why) => {
                return Err(format!(
                    "{SERVERS_VARIABLE}=containers, but no Docker engine answers ({why}); {BOTH_WAYS}"
                ));
            }
        };
        if !facts.container_support {
            return Err(format!(
                "{SERVERS_VARIABLE}=containers and a Docker engine answers at {address}, but \
                 the testkit was built without its `containers` feature: run \
                 `cargo test --features containers`"
            ));
        }
        Ok(Source::Containers)
    };
    match wanted.map(str::trim) {
        Some("local") if facts.local_binaries => Ok(Source::Local),
        Some("local") => Err(format!(
            "{SERVERS_VARIABLE}=local, but the PostgreSQL or Redis server binaries are not \
             installed; {BOTH_WAYS}"
        )),
        Some("containers") => containers(),
        Some(other) if !other.is_empty() => Err(format!(
            "{SERVERS_VARIABLE}={other:?} is neither `local` nor `containers`"
        )),
        _ if facts.local_binaries => Ok(Source::Local),
        _ if facts.docker.is_ok() && facts.container_support => Ok(Source::Containers),
        _ => Err(format!(
            "no servers to test against: the PostgreSQL and Redis server binaries are not \
             installed, and {}; {BOTH_WAYS}",
            match &facts.docker {
                Ok(address) => format!(
                    "the Docker engine at {address} needs the testkit's `containers` feature"
                ),
                Err(why) => format!("no Docker engine answers ({why})"),
            }
        )),
    }
}

/// Where the Docker engine listens: `DOCKER_HOST` (`unix://` or `tcp://`),
/// else its usual socket.
fn docker_address() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

/// Asks the Docker engine `GET /_ping`; its address when it answers `OK`.
pub fn docker_ping() -> Result<String, String> {
    let address = docker_address();
    let request = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";
    let timeout = Some(Duration::from_secs(2));
    let answer = if let Some(path) = address.strip_prefix("unix://") {
        let mut stream = std::os::unix::net::UnixStream::connect(path)
            .map_err(|err| format!("{address}: {err}"))?;
        stream.set_read_timeout(timeout).ok();
        stream
            .write_all(request)
            .map_err(|err| format!("{address}: {err}"))?;
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    } else if let Some(host) = address.strip_prefix("tcp://") {
        let mut stream =
            std::net::TcpStream::connect(host).map_err(|err| format!("{address}: {err}"))?;
        stream.set_read_timeout(timeout).ok();
        stream
            .write_all(request)
            .map_err(|err| format!("{address}: {err}"))?;
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    } else {
        return Err(format!(
            "DOCKER_HOST={address} is neither unix:// nor tcp://"
        ));
    };
    if answer.starts_with("HTTP/1.") && answer.contains(" 200 ") && answer.ends_with("OK") {
        Ok(address)
    } else {
        Err(format!(
            "{address} answered {:?}",
            answer.lines().next().unwrap_or("nothing")
        ))
    }
}

/// The facts of this machine.
pub fn facts() -> Facts {
    Facts {
        local_binaries: super::local::postgres_bin_dir().is_some()
            && super::local::redis_server_installed(),
        container_support: cfg!(feature = "containers"),
        docker: docker_ping(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(local: bool, support: bool, docker: bool) -> Facts {
        Facts {
            local_binaries: local,
            container_support: support,
            docker: if docker {
                Ok("unix:///var/run/docker.sock".into())
            } else {
                Err("connection refused".into())
            },
        }
    }

    #[test]
    fn local_binaries_come_first_then_containers_then_a_message() {
        assert_eq!(choose(None, &facts(true, true, true)), Ok(Source::Local));
        assert_eq!(
            choose(None, &facts(false, true, true)),
            Ok(Source::Containers)
        );
        let none = choose(None, &facts(false, true, false)).unwrap_err();
        assert!(
            none.contains("no Docker engine answers") && none.contains("apt-get install"),
            "{none}"
        );
        let unbuilt = choose(None, &facts(false, false, true)).unwrap_err();
        assert!(unbuilt.contains("`containers` feature"), "{unbuilt}");
    }

    #[test]
    fn the_variable_forces_a_way_or_says_why_it_cannot() {
        assert_eq!(
            choose(Some("local"), &facts(true, true, true)),
            Ok(Source::Local)
        );
        assert_eq!(
            choose(Some("containers"), &facts(true, true, true)),
            Ok(Source::Containers)
        );
        let no_docker = choose(Some("containers"), &facts(true, true, false)).unwrap_err();
        assert!(
            no_docker.contains("no Docker engine answers"),
            "{no_docker}"
        );
        let no_binaries = choose(Some("local"), &facts(false, true, true)).unwrap_err();
        assert!(
            no_binaries.contains("binaries are not installed"),
            "{no_binaries}"
        );
        assert!(choose(Some("docker"), &facts(true, true, true)).is_err());
    }

    /// On a machine without a Docker engine (this one, and CI), asking for
    /// containers fails at once, saying that no Docker engine answers: what
    /// `HYBRIDSTORE_TEST_SERVERS=containers cargo test` prints before any
    /// test runs. (With an engine, the choice is containers, or the message
    /// about the feature.)
    #[test]
    fn containers_asked_for_here_fail_at_once_unless_an_engine_answers() {
        let started = std::time::Instant::now();
        let here = super::facts();
        let chosen = choose(Some("containers"), &here);
        assert!(started.elapsed() < Duration::from_secs(5), "at once");
        match &here.docker {
            Err(_) => {
                let said = chosen.unwrap_err();
                assert!(said.contains("no Docker engine answers"), "{said}");
            }
            Ok(_) if here.container_support => assert_eq!(chosen, Ok(Source::Containers)),
            Ok(_) => assert!(chosen.unwrap_err().contains("`containers` feature")),
        }
    }
}
