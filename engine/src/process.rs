//! For kinds that run child processes: stopping a child's whole process group.

use std::process::Child;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group};

/// SIGTERM to the group, up to `grace` for `child` to exit, then SIGKILL; reaps `child`.
/// A command's own children (a shell's pipeline, a trainer's workers) go with it.
pub fn stop_group(pgid: Pid, child: &mut Child, grace: Duration) {
    let _ = kill_process_group(pgid, Signal::TERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill_process_group(pgid, Signal::KILL);
    let _ = child.wait();
}
