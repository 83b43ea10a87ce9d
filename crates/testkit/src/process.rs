//! Child processes that die with the test binary.
//!
//! Servers are started from one dedicated thread that lives as long as the
//! process, with `PR_SET_PDEATHSIG = SIGKILL`: the kernel kills them when that
//! thread (and so the test binary) goes away, even after a panic or a kill, so
//! no test run leaves servers behind. (The death signal follows the thread that
//! spawned the child, which is why it cannot be the test's own thread.)

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Mutex, OnceLock};

type SpawnRequest = (Command, Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    // SAFETY: prctl is async-signal-safe and touches no memory of
                    // the parent; it runs in the child between fork and exec.
                    unsafe {
                        command.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawn the testkit spawner thread");
        Mutex::new(requests)
    })
}

/// Spawns `command` so that it is killed when the test binary exits.
pub fn spawn_owned(command: Command) -> io::Result<Child> {
    let (reply, answer) = channel();
    spawner()
        .lock()
        .expect("spawner lock")
        .send((command, reply))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// Sends `signal` to `child` and waits for it to exit.
pub fn signal_and_wait(child: &mut Child, signal: libc::c_int) {
    // SAFETY: plain kill(2) on a pid we own and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
    let _ = child.wait();
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind an ephemeral port")
}
