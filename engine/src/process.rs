//! For kinds that run child processes: a stage's processes live in one process group of their
//! own, die with the engine, and are all gone before the stage's outputs are stored.
//!
//! - [`group_command`] and [`spawn_group`] start the child as the leader of a new group, with a
//!   parent-death signal (SIGHUP) so that an engine killed outright still takes the child with
//!   it. The signal is set by util-linux's `setpriv --pdeathsig` where it exists, so the spawn
//!   stays a `posix_spawn`; otherwise by a `pre_exec` hook, which forces a `fork` of the whole
//!   engine (measured: 3x the per-stage cost of 1,000 trivial stages). Only the direct
//!   child gets that signal; [`guarded_shell`] wraps a shell command so that the signal kills
//!   the whole group, background jobs included.
//! - [`reap_group`] kills whatever is left of a group once its leader has exited (a background
//!   job still writing into the outputs) and waits until none of it is left, so that nothing
//!   writes after the outputs are hashed, and no retry starts while a writer may live.
//! - [`become_subreaper`] makes the engine the parent of its stages' orphans, so that it can
//!   reap them (they would otherwise be zombies where PID 1 does not reap).

use std::ffi::OsStr;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::process::{
    Pid, Signal, WaitOptions, kill_process_group, test_kill_process_group, waitpgid,
};

/// SIGTERM to the group, up to `grace` for `child` to exit, then SIGKILL; reaps `child` and
/// what is left of its group.
/// A command's own children (a shell's pipeline, a trainer's workers) go with it.
pub fn stop_group(pgid: Pid, child: &mut Child, grace: Duration) {
    let _ = kill_process_group(pgid, Signal::TERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            let _ = reap_group(pgid, GROUP_DEADLINE);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill_process_group(pgid, Signal::KILL);
    let _ = child.wait();
    let _ = reap_group(pgid, GROUP_DEADLINE);
}

/// How long [`reap_group`] waits for a killed group to disappear.
pub const GROUP_DEADLINE: Duration = Duration::from_secs(10);

/// What [`reap_group`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftovers {
    /// The group was already empty.
    None,
    /// Processes of the group were still running; they were killed and are gone.
    Killed,
}

/// Kills every process left in group `pgid` (its leader has been waited for already) and
/// waits until the group is empty, reaping those that are this process's children.
/// `Err` when processes of the group outlive `deadline`: the caller must not trust the
/// stage's outputs.
pub fn reap_group(pgid: Pid, deadline: Duration) -> Result<Leftovers, String> {
    if test_kill_process_group(pgid).is_err() {
        return Ok(Leftovers::None);
    }
    let _ = kill_process_group(pgid, Signal::KILL);
    let until = Instant::now() + deadline;
    let mut pause = Duration::from_micros(200);
    loop {
        // Reap the group's zombies we are the parent of (see `become_subreaper`).
        while let Ok(Some(_)) = waitpgid(pgid, WaitOptions::NOHANG) {}
        if test_kill_process_group(pgid).is_err() {
            return Ok(Leftovers::Killed);
        }
        if Instant::now() >= until {
            return Err(format!(
                "processes of the stage's group {} survived SIGKILL for {deadline:?}",
                pgid.as_raw_nonzero()
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Makes this process the reaper of its descendants' orphans. Best effort: without it, the
/// orphans of a stage go to PID 1, and [`reap_group`] waits for it to reap them.
pub fn become_subreaper() {
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
}

/// `setpriv` (util-linux) when it is on the PATH and takes `--pdeathsig`; looked up once.
fn launcher() -> Option<&'static Path> {
    static LAUNCHER: OnceLock<Option<PathBuf>> = OnceLock::new();
    LAUNCHER
        .get_or_init(|| {
            let path = std::env::var_os("PATH")?;
            let setpriv = std::env::split_paths(&path)
                .map(|dir| dir.join("setpriv"))
                .find(|p| p.is_file())?;
            let works = Command::new(&setpriv)
                .args(["--pdeathsig", "HUP", "--", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            works.then_some(setpriv)
        })
        .as_deref()
}

/// A command that runs `program` with a parent-death signal of SIGHUP, through `setpriv` when
/// there is one; add its args and spawn it with [`spawn_group`].
pub fn group_command(program: impl AsRef<OsStr>) -> Command {
    match launcher() {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "HUP", "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Starts `command` as the leader of a new process group that gets SIGHUP when the thread
/// that spawned it exits (with the engine, or a killed engine). Spawn from a thread that lives
/// as long as the child: a worker thread that waits for it. A command not made by
/// [`group_command`] gets the signal from a `pre_exec` hook.
pub fn spawn_group(command: &mut Command) -> io::Result<(Child, Pid)> {
    command.process_group(0);
    if launcher().is_none_or(|setpriv| command.get_program() != setpriv.as_os_str()) {
        let parent = rustix::process::getpid();
        // Runs in the forked child before exec, so it may only make async-signal-safe calls:
        // two syscalls through rustix, no allocation, no locks.
        #[allow(unsafe_code)]
        // SAFETY: the closure calls only `prctl(PR_SET_PDEATHSIG)` and `getppid`, both
        // async-signal-safe system calls, and builds its error without allocating.
        unsafe {
            command.pre_exec(move || {
                rustix::process::set_parent_process_death_signal(Some(Signal::HUP))?;
                // The engine may have died between fork and the call above.
                if rustix::process::getppid() != Some(parent) {
                    return Err(io::Error::from_raw_os_error(
                        rustix::io::Errno::SRCH.raw_os_error(),
                    ));
                }
                Ok(())
            });
        }
    }
    let child = command.spawn()?;
    let pgid = Pid::from_raw(child.id() as i32)
        .ok_or_else(|| io::Error::other("the child has no process id"))?;
    Ok((child, pgid))
}

/// `sh -c` arguments that run `cmd` as a background job of a guard shell: when the engine dies
/// the guard gets SIGHUP (see [`spawn_group`]) and kills the whole group, so nothing the
/// command started outlives a killed engine. The command's exit status is the guard's.
pub fn guarded_shell(cmd: &str) -> [&str; 4] {
    ["-c", GUARD, "autoscale-stage", cmd]
}

const GUARD: &str = "trap 'kill -KILL 0' HUP\nsh -c \"$1\" &\nwait $!";

#[cfg(test)]
mod tests {
    use super::*;

    fn read_pid(path: &Path) -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn alive(pid: i32) -> bool {
        Pid::from_raw(pid).is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
    }

    #[test]
    fn the_guard_keeps_the_exit_status_and_reap_kills_background_jobs() {
        become_subreaper();
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let cmd = format!(
            "(sleep 30; echo late) & echo $! > '{}'; exit 3",
            pidfile.display()
        );
        let (mut child, pgid) = spawn_group(
            group_command("sh")
                .args(guarded_shell(&cmd))
                .stdin(Stdio::null()),
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(3));
        let bg = read_pid(&pidfile);
        assert!(alive(bg), "the background job runs on after the command");
        assert_eq!(reap_group(pgid, GROUP_DEADLINE), Ok(Leftovers::Killed));
        assert!(!alive(bg), "reap_group left {bg} running");
        assert_eq!(reap_group(pgid, GROUP_DEADLINE), Ok(Leftovers::None));
    }

    #[test]
    fn a_guard_that_loses_its_parent_kills_its_whole_group() {
        // A middle process spawns the guarded command from a thread, then exits: the
        // parent-death signal must take the command's background job with it.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let inner = format!("sleep 30 & echo $! > '{}'; wait", pidfile.display());
        let handle = std::thread::spawn(move || {
            let (child, _) = spawn_group(
                group_command("sh")
                    .args(guarded_shell(&inner))
                    .stdin(Stdio::null()),
            )
            .unwrap();
            // Keep `child` unwaited; the thread's exit is the "engine" dying.
            std::mem::forget(child);
            for _ in 0..500 {
                if pidfile.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let bg = read_pid(&pidfile);
            assert!(alive(bg), "the job runs while its guard's parent lives");
            pidfile
        });
        let pidfile = handle.join().unwrap();
        let bg = read_pid(&pidfile);
        // With the test process as subreaper (the other test) the killed job may linger as a
        // zombie of ours; `alive` counts a zombie as dead.
        let until = Instant::now() + Duration::from_secs(10);
        while alive(bg) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(bg), "{bg} outlived its guard's parent thread");
    }

    #[test]
    fn without_setpriv_the_pre_exec_hook_sets_the_signal() {
        let (mut child, _) = spawn_group(
            Command::new("sh")
                .args([
                    "-c",
                    "grep -q '^SigCgt' /proc/self/status; cat /proc/$$/stat",
                ])
                .stdout(Stdio::piped())
                .stdin(Stdio::null()),
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success());
        // The pre_exec hook ran (a failing hook makes `spawn` fail), and the child leads its
        // own group: field 5 of its stat is its pgid, its pid.
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        let fields: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(fields[0], fields[4], "{out}");
    }
}
