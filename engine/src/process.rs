//! For kinds that run child processes: a stage's processes live in one process group of their
//! own, die with the engine, and are all gone before the stage's outputs are stored.
//!
//! - [`spawn_group`] starts a command as the leader of a new process group.
//! - [`guarded_shell`] runs a shell command so that an engine killed outright (SIGKILL
//!   included) takes the command's whole group with it, background jobs included. One
//!   *watcher* `sh` per engine reads the groups the engine registers ([`watch`]) from a pipe
//!   whose only writer is the engine; the kernel closes it when the engine dies, however it
//!   dies, and the watcher kills every group still registered. The command's shell holds at
//!   its first line until its group is registered, so there is no moment when it runs
//!   unwatched. Per stage this costs one `sh`, as a plain `sh -c` would (measured in
//!   BENCHMARKS.md; a guard shell per stage cost two more `fork`s).
//! - [`group_command`] is for programs that are not shell commands (the trainer): a parent-death
//!   signal (SIGHUP), set by util-linux's `setpriv --pdeathsig` where it exists, so the spawn
//!   stays a `posix_spawn`; otherwise by a `pre_exec` hook, which forces a `fork` of the whole
//!   engine. Only the direct child gets that signal.
//! - [`reap_group`] kills whatever is left of a group once its leader has exited (a background
//!   job still writing into the outputs) and waits until none of it is left, so that nothing
//!   writes after the outputs are hashed, and no retry starts while a writer may live.
//! - [`become_subreaper`] makes the engine the parent of its stages' orphans, so that it can
//!   reap them (they would otherwise be zombies where PID 1 does not reap).
//! - [`group_record`] and [`kill_stale_group`]: a stage's group is recorded in its key's lock
//!   file; a run that takes over the lock of a holder that died kills that group if it still
//!   runs (a process that escaped the guard), before it stages anything.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
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

/// The start time of process `pid` in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces; count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What a key's lock file records of a stage's process group.
pub fn group_record(pgid: Pid) -> autoscale_cache::ProcessGroup {
    autoscale_cache::ProcessGroup {
        pgid: pgid.as_raw_nonzero().get(),
        leader_start: start_time(pgid.as_raw_nonzero().get()).unwrap_or(0),
    }
}

/// Kills the process group a dead lock holder recorded, if it still runs: only a holder on
/// this host that is gone, and only the same group: its leader still runs with the recorded
/// start time. `true` when a group was killed.
pub fn kill_stale_group(previous: &autoscale_cache::LockHolder) -> bool {
    let Some(group) = previous.group else {
        return false;
    };
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let holder_alive = Pid::from_raw(previous.pid as i32)
        .is_some_and(|pid| rustix::process::test_kill_process(pid) != Err(rustix::io::Errno::SRCH));
    if previous.host != host || holder_alive || previous.pid == std::process::id() {
        return false;
    }
    let Some(pgid) = Pid::from_raw(group.pgid) else {
        return false;
    };
    if test_kill_process_group(pgid).is_err() {
        return false;
    }
    // Only while its leader lives can the group be told apart from a later one that reused the
    // id (a lock file keeps the group of a run that ended cleanly, long since reaped). A group
    // whose leader exited before its engine died is the watcher's to kill.
    if start_time(group.pgid) != Some(group.leader_start) {
        return false;
    }
    tracing::warn!(pgid = group.pgid, holder = previous.pid, label = %previous.label, "killing the process group a dead run left behind");
    let _ = kill_process_group(pgid, Signal::KILL);
    // Not our children: their zombies are reaped by whoever adopted them, or linger where PID 1
    // does not reap; SIGKILL cannot be ignored, so a short wait is enough.
    let _ = reap_group(pgid, Duration::from_secs(2));
    true
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

/// The engine's stage watcher: one `sh` per engine process, in a process group of its own and
/// deaf to terminal signals, reading from a pipe whose only writer is this process (close-on-exec,
/// so no child inherits it) the stage groups that start (`+PGID`) and end (`-PGID`). The kernel
/// closes the pipe however this process dies, SIGKILL included; the watcher then kills every
/// group still registered, background jobs included, and exits.
struct Watcher {
    pipe: Mutex<io::PipeWriter>,
}

impl Watcher {
    fn send(&self, op: char, pgid: Pid) -> io::Result<()> {
        let line = format!("{op}{}\n", pgid.as_raw_nonzero());
        let mut pipe = self
            .pipe
            .lock()
            .map_err(|_| io::Error::other("watcher lock"))?;
        pipe.write_all(line.as_bytes())
    }
}

fn watcher() -> io::Result<&'static Watcher> {
    static WATCHER: OnceLock<Result<Watcher, String>> = OnceLock::new();
    WATCHER
        .get_or_init(|| {
            let (reader, writer) = io::pipe().map_err(|e| e.to_string())?;
            let mut command = Command::new(shell());
            command
                .args(["-c", WATCH])
                .stdin(reader)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0);
            // Never waited for: it lives as long as this process and exits when it does.
            let child = command
                .spawn()
                .map_err(|e| format!("cannot start the stage watcher (`sh`): {e}"))?;
            drop(child);
            Ok(Watcher {
                pipe: Mutex::new(writer),
            })
        })
        .as_ref()
        .map_err(|e| io::Error::other(e.clone()))
}

// Pure `sh`, no process per message: the registered groups are a space-separated list.
const WATCH: &str = "trap '' INT TERM HUP QUIT
groups=' '
while IFS= read -r line; do
  case $line in
    +*) groups=\"$groups${line#+} \" ;;
    -*) g=${line#-}
        case $groups in *\" $g \"*) groups=\"${groups%% $g *} ${groups#* $g }\" ;; esac ;;
  esac
done
for g in $groups; do kill -KILL -\"$g\" 2>/dev/null; done";

/// A stage's process group, registered with the engine's watcher, which kills the group if the
/// engine dies while it is registered. Dropping it unregisters the group: drop it only once the
/// group is gone ([`reap_group`]).
#[derive(Debug)]
pub struct Watched(Pid);

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(w) = watcher() {
            let _ = w.send('-', self.0);
        }
    }
}

/// Registers a process group that a stage started (the trainer's, say) with the engine's
/// watcher, so that it dies with the engine.
pub fn watch(pgid: Pid) -> io::Result<Watched> {
    watcher()?.send('+', pgid)?;
    Ok(Watched(pgid))
}

/// A shell command that will not begin until its process group is watched (see
/// [`GuardedShell::spawn`]). Set its working directory, environment and output on `command`.
pub struct GuardedShell {
    pub command: Command,
    go: io::PipeWriter,
}

/// [`spawn_group`], then the group registered with the watcher; a group that cannot be watched
/// is killed and reaped at once, since nothing would stop it should the engine die.
pub fn spawn_watched(command: &mut Command) -> io::Result<(Child, Pid, Watched)> {
    let (mut child, pgid) = spawn_group(command)?;
    match watch(pgid) {
        Ok(watched) => Ok((child, pgid, watched)),
        Err(e) => {
            let _ = kill_process_group(pgid, Signal::KILL);
            let _ = child.wait();
            Err(io::Error::other(format!(
                "the stage watcher is gone ({e}); refusing to start a command that could outlive the engine"
            )))
        }
    }
}

/// `sh -c cmd`, held at its first line until the engine has registered its group with the
/// watcher (see the module docs); `cmd`'s stdin is `/dev/null`, and its exit status the shell's.
pub fn guarded_shell(cmd: &str) -> io::Result<GuardedShell> {
    let (reader, go) = io::pipe()?;
    let mut command = Command::new(shell());
    command
        .args(["-c", HOLD, "autoscale-stage", cmd])
        .stdin(reader);
    Ok(GuardedShell { command, go })
}

impl GuardedShell {
    /// Starts the shell as the leader of a new process group, registers the group with the
    /// watcher, and only then lets the command begin. An engine that dies before that leaves a
    /// shell that sees end-of-file and exits without running anything.
    pub fn spawn(self) -> io::Result<(Child, Pid, Watched)> {
        let GuardedShell {
            mut command,
            mut go,
        } = self;
        let (child, pgid, watched) = spawn_watched(&mut command)?;
        // Our copy of the hold pipe's read end goes with the command.
        drop(command);
        // A command that exits without reading is no error here: its exit status says it.
        let _ = go.write_all(b"go\n");
        Ok((child, pgid, watched))
    }
}

// `shift` inside the eval leaves the command no positional params, as `sh -c` would, and the
// hold line sets no variable it could see.
const HOLD: &str = "read -r AUTOSCALE_HOLD || exit 125
unset AUTOSCALE_HOLD
exec </dev/null
eval \"shift
$1\"";

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
        let (mut child, pgid, watched) = guarded_shell(&cmd).unwrap().spawn().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(3));
        let bg = read_pid(&pidfile);
        assert!(alive(bg), "the background job runs on after the command");
        assert_eq!(reap_group(pgid, GROUP_DEADLINE), Ok(Leftovers::Killed));
        assert!(!alive(bg), "reap_group left {bg} running");
        assert_eq!(reap_group(pgid, GROUP_DEADLINE), Ok(Leftovers::None));
        drop(watched);
    }

    /// The watcher as the engine starts it, with the test holding the pipe's write end:
    /// closing it is the engine dying.
    fn a_watcher() -> (Child, io::PipeWriter) {
        let (reader, writer) = io::pipe().unwrap();
        let child = Command::new(shell())
            .args(["-c", WATCH])
            .stdin(reader)
            .process_group(0)
            .spawn()
            .unwrap();
        (child, writer)
    }

    fn wait_for_file(path: &Path) {
        let until = Instant::now() + Duration::from_secs(10);
        while !path.exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    #[test]
    fn when_the_engine_dies_the_watcher_kills_every_registered_group_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let (mut watcher, mut pipe) = a_watcher();
        let mut groups = Vec::new();
        for name in ["a", "b", "c"] {
            let pidfile = dir.path().join(name);
            let cmd = format!("sleep 30 & echo $! > '{}'; wait", pidfile.display());
            let mut command = Command::new("sh");
            command.args(["-c", &cmd]);
            let (child, pgid) = spawn_group(&mut command).unwrap();
            writeln!(pipe, "+{}", pgid.as_raw_nonzero()).unwrap();
            wait_for_file(&pidfile);
            groups.push((child, pgid, read_pid(&pidfile)));
        }
        // `b` ends its registration: the watcher must leave it alone.
        writeln!(pipe, "-{}", groups[1].1.as_raw_nonzero()).unwrap();
        writeln!(pipe, "-999999999").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(groups.iter().all(|(_, _, bg)| alive(*bg)));
        drop(pipe);
        watcher.wait().unwrap();
        for (i, (child, pgid, bg)) in groups.iter_mut().enumerate() {
            let until = Instant::now() + Duration::from_secs(10);
            while i != 1 && alive(*bg) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(alive(*bg), i == 1, "group {i}'s background job");
            let _ = kill_process_group(*pgid, Signal::KILL);
            let _ = child.wait();
        }
    }

    #[test]
    fn a_held_shell_whose_engine_dies_before_the_go_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let mut held = guarded_shell(&format!("touch '{}'", marker.display())).unwrap();
        held.command.stdout(Stdio::null());
        let GuardedShell { mut command, go } = held;
        let (mut child, _) = spawn_group(&mut command).unwrap();
        drop(go);
        assert_eq!(child.wait().unwrap().code(), Some(125));
        assert!(!marker.exists());
    }

    #[test]
    fn a_command_that_leaves_nothing_behind_leaves_an_empty_group() {
        become_subreaper();
        let (mut child, pgid, _watched) = guarded_shell("true").unwrap().spawn().unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(reap_group(pgid, GROUP_DEADLINE), Ok(Leftovers::None));
    }

    #[test]
    fn a_command_sees_no_guard_variables_or_arguments_and_reads_dev_null() {
        let cmd = "echo \"[$#][$AUTOSCALE_HOLD][$1]\"; cat; echo done";
        let mut held = guarded_shell(cmd).unwrap();
        held.command.stdout(Stdio::piped());
        let (child, _, _watched) = held.spawn().unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "[0][][]\ndone\n");
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
