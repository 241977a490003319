//! For kinds that run child processes: a stage's processes live in one process group of their
//! own, die with the engine, and are all gone before the stage's outputs are stored.
//!
//! - [`spawn_group`] starts a command as the leader of a new process group.
//! - [`guarded_shell`] runs a shell command so that an engine killed outright (SIGKILL
//!   included) takes the command's whole group with it, background jobs included: a guard shell
//!   runs the command as a job and watches the engine's *lifeline*, a pipe whose only writer
//!   is the engine. The kernel closes it when the engine dies, however it dies, and the guard
//!   then kills its group. This costs a `fork` of `sh`, not the `exec` of a second shell or of
//!   `setpriv` (measured in BENCHMARKS.md).
//! - [`group_command`] is for programs that are not shell commands (the trainer): a parent-death
//!   signal (SIGHUP), set by util-linux's `setpriv --pdeathsig` where it exists, so the spawn
//!   stays a `posix_spawn`; otherwise by a `pre_exec` hook, which forces a `fork` of the whole
//!   engine. Only the direct child gets that signal.
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

/// Waits for `child` to exit, or for `cancelled` to say stop (checked every `every`); `None`
/// when cancelled, the child still running. Wakes the moment the child exits (a pidfd, where the
/// kernel has them), so a stage of a few milliseconds is not stretched by a polling interval.
pub fn wait_or_cancel(
    child: &mut Child,
    cancelled: impl Fn() -> bool,
    every: Duration,
) -> io::Result<Option<std::process::ExitStatus>> {
    let pidfd = Pid::from_raw(child.id() as i32).and_then(|pid| {
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
    });
    let mut pause = Duration::from_micros(100);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if cancelled() {
            return Ok(None);
        }
        match &pidfd {
            Some(fd) => {
                let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
                let timeout = rustix::event::Timespec::try_from(every).ok();
                // Interrupted or timed out: look again.
                let _ = rustix::event::poll(&mut fds, timeout.as_ref());
            }
            None => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(every);
            }
        }
    }
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
/// there is one, else through a `pre_exec` hook; add its args and spawn it with
/// [`spawn_group`].
pub fn group_command(program: impl AsRef<OsStr>) -> Command {
    match launcher() {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "HUP", "--"]).arg(program);
            command
        }
        None => {
            let mut command = Command::new(program);
            with_death_signal_hook(&mut command);
            command
        }
    }
}

/// Sets SIGHUP as `command`'s parent-death signal in the forked child, before exec. The signal
/// comes when the thread that spawned the child exits: spawn from a thread that lives as long
/// as the child.
fn with_death_signal_hook(command: &mut Command) {
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

/// Starts `command` as the leader of a new process group; returns the child and the group.
pub fn spawn_group(command: &mut Command) -> io::Result<(Child, Pid)> {
    command.process_group(0);
    let child = command.spawn()?;
    let pgid = Pid::from_raw(child.id() as i32)
        .ok_or_else(|| io::Error::other("the child has no process id"))?;
    Ok((child, pgid))
}

/// `sh` as found on the PATH, looked up once: a spawn of a bare `sh` tries every PATH entry
/// in turn (nine failed `execve`s per stage on a typical PATH).
fn shell() -> &'static Path {
    static SHELL: OnceLock<PathBuf> = OnceLock::new();
    SHELL.get_or_init(|| {
        std::env::var_os("PATH")
            .and_then(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join("sh"))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| PathBuf::from("/bin/sh"))
    })
}

/// The engine's lifeline: a pipe whose write end only this process holds (close-on-exec, so no
/// child inherits it). Guard shells read its other end and see end-of-file when this process
/// is gone.
fn lifeline() -> io::Result<&'static io::PipeReader> {
    static LIFELINE: OnceLock<Option<(io::PipeReader, io::PipeWriter)>> = OnceLock::new();
    LIFELINE
        .get_or_init(|| io::pipe().ok())
        .as_ref()
        .map(|(reader, _)| reader)
        .ok_or_else(|| io::Error::other("cannot make the stage lifeline pipe"))
}

/// `sh`, running `cmd` in a guard shell that kills its whole group when the engine dies (see
/// the module docs); its stdin is the engine's lifeline, and `cmd`'s is `/dev/null`. The
/// command's exit status is the guard's. Spawn it with [`spawn_group`].
pub fn guarded_shell(cmd: &str) -> io::Result<Command> {
    guarded_shell_on(cmd, lifeline()?.try_clone()?)
}

fn guarded_shell_on(cmd: &str, lifeline: io::PipeReader) -> io::Result<Command> {
    let mut command = Command::new(shell());
    command
        .args(["-c", GUARD, "autoscale-stage", cmd])
        .stdin(lifeline);
    Ok(command)
}

// The job is started first, so it sees no variable of the guard's; `shift` inside the eval
// leaves it no positional params, as `sh -c` would. Fd 9 keeps the lifeline for the watcher,
// which the guard stops and waits for once the job is done, so that a command that leaves
// nothing behind leaves an empty group.
const GUARD: &str = "exec 9<&0 </dev/null
eval \"shift
$1\" 9<&- &
c=$!
{ read _ <&9; kill -KILL 0; } &
wait $c; s=$?; kill $! 2>/dev/null; wait $!; exit $s";

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
        let (mut child, pgid) = spawn_group(&mut guarded_shell(&cmd).unwrap()).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(3));
        let bg = read_pid(&pidfile);
        assert!(alive(bg), "the background job runs on after the command");
        assert_eq!(reap_group(pgid, GROUP_DEADLINE), Ok(Leftovers::Killed));
        assert!(!alive(bg), "reap_group left {bg} running");
        assert_eq!(reap_group(pgid, GROUP_DEADLINE), Ok(Leftovers::None));
    }

    #[test]
    fn a_guard_whose_lifeline_closes_kills_its_whole_group() {
        // The test holds the lifeline's write end; dropping it is the engine dying.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let inner = format!("sleep 30 & echo $! > '{}'; wait", pidfile.display());
        let (reader, writer) = io::pipe().unwrap();
        let (mut child, _) = spawn_group(&mut guarded_shell_on(&inner, reader).unwrap()).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while !pidfile.exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        let bg = read_pid(&pidfile);
        assert!(alive(bg), "the job runs while the lifeline is open");
        drop(writer);
        let status = child.wait().unwrap();
        assert!(!status.success(), "{status:?}");
        let until = Instant::now() + Duration::from_secs(10);
        while alive(bg) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(bg), "{bg} outlived the lifeline");
    }

    #[test]
    fn a_command_that_leaves_nothing_behind_leaves_an_empty_group() {
        become_subreaper();
        let (mut child, pgid) = spawn_group(&mut guarded_shell("true").unwrap()).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(reap_group(pgid, GROUP_DEADLINE), Ok(Leftovers::None));
    }

    #[test]
    fn a_command_sees_no_guard_variables_or_arguments_and_reads_dev_null() {
        let cmd = "echo \"[$#][$c][$s][$1]\"; cat; echo done";
        let mut command = guarded_shell(cmd).unwrap();
        command.stdout(Stdio::piped());
        let (child, _) = spawn_group(&mut command).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "[0][][][]\ndone\n");
    }

    #[test]
    fn without_setpriv_the_pre_exec_hook_sets_the_signal() {
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                "grep -q '^SigCgt' /proc/self/status; cat /proc/$$/stat",
            ])
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        with_death_signal_hook(&mut command);
        let (mut child, _) = spawn_group(&mut command).unwrap();
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
