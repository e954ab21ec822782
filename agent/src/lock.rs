//! The service lock: one `gstacks-agent` per host.
//!
//! `agent.lock` in the state dir is held with `flock(LOCK_EX)` for the life of
//! the agent and records who holds it (pid, the process's kernel start time,
//! wall-clock start). The kernel drops a flock when its holder dies, so a
//! crashed agent never blocks the next one; the file it leaves behind is a
//! *stale* lock that `service lock status` reports and `clear --force` removes.
//!
//! Invariants: the agent writes its identity only while holding the flock; a
//! lock file is unlinked only by a process holding its flock; after locking,
//! the holder checks that the path still names the inode it locked (another
//! process may have unlinked it in between) and retries otherwise.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::AgentError;
use crate::state::ensure_state_dir;

pub const LOCK_FILE: &str = "agent.lock";

/// Who wrote the lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Start time of the process in clock ticks since boot (from
    /// `/proc/<pid>/stat`), so a reused pid is not mistaken for the holder.
    pub proc_start_ticks: Option<u64>,
    pub started_at_ms: i64,
}

impl Holder {
    fn current() -> Self {
        let pid = std::process::id();
        Self {
            pid,
            proc_start_ticks: proc_start_ticks(pid),
            started_at_ms: now_ms(),
        }
    }

    fn encode(&self) -> String {
        let mut text = format!("pid={}\nstarted_at_ms={}\n", self.pid, self.started_at_ms);
        if let Some(ticks) = self.proc_start_ticks {
            text.push_str(&format!("proc_start_ticks={ticks}\n"));
        }
        text
    }

    /// Parses what [`Holder::encode`] wrote; `None` for anything else
    /// (an empty file of an agent killed between create and write).
    pub fn decode(text: &str) -> Option<Self> {
        let mut pid = None;
        let mut started = None;
        let mut ticks = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("pid", v)) => pid = v.trim().parse().ok(),
                Some(("started_at_ms", v)) => started = v.trim().parse().ok(),
                Some(("proc_start_ticks", v)) => ticks = v.trim().parse().ok(),
                _ => {}
            }
        }
        Some(Self {
            pid: pid?,
            proc_start_ticks: ticks,
            started_at_ms: started?,
        })
    }

    /// Whether the process that wrote this is still running (same pid and,
    /// when recorded, the same kernel start time).
    pub fn is_alive(&self) -> bool {
        match (proc_start_ticks(self.pid), self.proc_start_ticks) {
            (None, _) => false,
            (Some(now), Some(recorded)) => now == recorded,
            (Some(_), None) => true,
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} (started {})",
            self.pid,
            format_utc(self.started_at_ms)
        )
    }
}

/// The held lock. Dropping it (clean shutdown) removes the file.
pub struct ServiceLock {
    path: PathBuf,
    lock: Option<Flock<File>>,
}

impl fmt::Debug for ServiceLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceLock")
            .field("path", &self.path)
            .finish()
    }
}

impl ServiceLock {
    /// Takes the lock or says who holds it.
    pub fn acquire(state_dir: &Path) -> Result<Self, AgentError> {
        ensure_state_dir(state_dir)?;
        let path = state_dir.join(LOCK_FILE);
        let io = |e: std::io::Error| AgentError::io("service lock", &path, e);
        // A concurrent `clear --force` may unlink the file between our open
        // and our flock; then we locked an orphan inode and try again.
        for _ in 0..16 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&path)
                .map_err(io)?;
            let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((mut file, Errno::EWOULDBLOCK)) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let holder = Holder::decode(&text)
                        .map(|h| h.to_string())
                        .unwrap_or_else(|| "a process that has not written its pid yet".to_owned());
                    return Err(AgentError::LockHeld { path, holder });
                }
                Err((_, errno)) => return Err(io(errno.into())),
            };
            if !same_inode(&lock, &path) {
                continue;
            }
            lock.set_len(0).map_err(io)?;
            lock.rewind().map_err(io)?;
            lock.write_all(Holder::current().encode().as_bytes())
                .map_err(io)?;
            lock.sync_all().map_err(io)?;
            return Ok(Self {
                path,
                lock: Some(lock),
            });
        }
        Err(AgentError::LockHeld {
            path,
            holder: "processes that keep replacing the lock file".to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ServiceLock {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            // Unlink while still holding the flock, then release it.
            let _ = fs::remove_file(&self.path);
            drop(lock);
        }
    }
}

fn same_inode(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// What `service lock status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockStatus {
    /// No lock file: no agent runs (or it shut down cleanly).
    Free,
    /// A process holds the flock. `alive` says whether the pid in the file
    /// still runs (false when the flock was inherited by another process).
    Held { holder: Option<Holder>, alive: bool },
    /// A lock file without a flock: its writer died without cleaning up.
    Stale { holder: Option<Holder> },
}

impl LockStatus {
    pub fn describe(&self, path: &Path) -> String {
        let p = path.display();
        match self {
            LockStatus::Free => format!("service lock {p}: free (no agent holds it)"),
            LockStatus::Held { holder: Some(h), alive: true } => {
                format!("service lock {p}: held by {h}, process is alive")
            }
            LockStatus::Held { holder, alive: false } => format!(
                "service lock {p}: held, but the recorded holder {} is not running (another process inherited the lock)",
                holder.as_ref().map_or("(unreadable)".to_owned(), |h| h.to_string())
            ),
            LockStatus::Held { holder: None, .. } => {
                format!("service lock {p}: held by a process that has not written its pid yet")
            }
            LockStatus::Stale { holder } => format!(
                "service lock {p}: stale; last holder {} is not running. Remove it with `gstacks-agent service lock clear --force`",
                holder.as_ref().map_or("(unreadable)".to_owned(), |h| h.to_string())
            ),
        }
    }
}

/// Reports the lock without taking it (the kernel's `/proc/locks` says
/// whether the file's inode is flocked).
pub fn status(state_dir: &Path) -> Result<LockStatus, AgentError> {
    let path = state_dir.join(LOCK_FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LockStatus::Free),
        Err(e) => return Err(AgentError::io("service lock", &path, e)),
    };
    let holder = read_holder(&file);
    let meta = file
        .metadata()
        .map_err(|e| AgentError::io("service lock", &path, e))?;
    let held = match fs::read_to_string("/proc/locks") {
        Ok(locks) => flock_held_in(&locks, meta.dev(), meta.ino()),
        // Without /proc, fall back to probing with a shared try-lock.
        Err(_) => match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_probe) => false,
            Err((_, Errno::EWOULDBLOCK)) => true,
            Err((_, errno)) => return Err(AgentError::io("service lock", &path, errno.into())),
        },
    };
    Ok(if held {
        let alive = holder.as_ref().is_some_and(Holder::is_alive);
        LockStatus::Held { holder, alive }
    } else {
        LockStatus::Stale { holder }
    })
}

/// `service lock clear`: refuses without `force`, never breaks a live lock,
/// removes a stale one. Returns what was removed.
pub fn clear(state_dir: &Path, force: bool) -> Result<LockStatus, AgentError> {
    let path = state_dir.join(LOCK_FILE);
    if !force {
        return Err(AgentError::LockClearRefused {
            path,
            message: "refusing to clear without --force (check `gstacks-agent service lock status` first)".to_owned(),
        });
    }
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LockStatus::Free),
        Err(e) => return Err(AgentError::io("service lock", &path, e)),
    };
    let holder = read_holder(&file);
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            if same_inode(&lock, &path) {
                fs::remove_file(&path)
                    .map_err(|e| AgentError::io("removing service lock", &path, e))?;
            }
            drop(lock);
            Ok(LockStatus::Stale { holder })
        }
        Err((_, Errno::EWOULDBLOCK)) => Err(AgentError::LockClearRefused {
            path,
            message: format!(
                "held by {}, which is alive; refusing to break a live lock (stop that agent first)",
                holder.map_or("a running process".to_owned(), |h| h.to_string())
            ),
        }),
        Err((_, errno)) => Err(AgentError::io("service lock", &path, errno.into())),
    }
}

fn read_holder(mut file: &File) -> Option<Holder> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Holder::decode(&text)
}

/// Whether `/proc/locks` lists a FLOCK on the inode `dev`/`ino`.
/// Lines look like `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`;
/// blocked waiters (`-> FLOCK ...`) do not count.
pub fn flock_held_in(proc_locks: &str, dev: u64, ino: u64) -> bool {
    let major = nix::sys::stat::major(dev);
    let minor = nix::sys::stat::minor(dev);
    proc_locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") {
            return false;
        }
        let Some(id) = fields.get(5) else {
            return false;
        };
        let parts: Vec<&str> = id.split(':').collect();
        let [maj, min, inode] = parts.as_slice() else {
            return false;
        };
        u64::from_str_radix(maj, 16) == Ok(major)
            && u64::from_str_radix(min, 16) == Ok(minor)
            && inode.parse::<u64>() == Ok(ino)
    })
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot).
pub fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `2026-11-23T13:10:49Z` from Unix milliseconds (UTC, second precision).
pub fn format_utc(ms: i64) -> String {
    let since_epoch = std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + since_epoch).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_names_the_holder_and_drop_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = ServiceLock::acquire(dir.path()).unwrap();
        let err = ServiceLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        match status(dir.path()).unwrap() {
            LockStatus::Held {
                holder: Some(h),
                alive: true,
            } => assert_eq!(h.pid, std::process::id()),
            other => panic!("expected held and alive, got {other:?}"),
        }
        drop(first);
        assert_eq!(status(dir.path()).unwrap(), LockStatus::Free);
        let _again = ServiceLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn clear_refuses_without_force_and_refuses_a_live_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _held = ServiceLock::acquire(dir.path()).unwrap();
        let err = clear(dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        let err = clear(dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("alive"), "{err}");
        assert!(dir.path().join(LOCK_FILE).exists());
    }

    #[test]
    fn stale_lock_is_reported_and_cleared_with_force() {
        let dir = tempfile::tempdir().unwrap();
        // What an agent killed with -9 leaves: a file, no flock, a dead pid.
        let dead = Holder {
            pid: u32::MAX - 1,
            proc_start_ticks: Some(1),
            started_at_ms: 1_700_000_000_000,
        };
        fs::write(dir.path().join(LOCK_FILE), dead.encode()).unwrap();
        let st = status(dir.path()).unwrap();
        assert_eq!(
            st,
            LockStatus::Stale {
                holder: Some(dead.clone())
            }
        );
        assert!(st.describe(dir.path()).contains("clear --force"));
        assert!(clear(dir.path(), false).is_err());
        assert!(dir.path().join(LOCK_FILE).exists());
        assert_eq!(
            clear(dir.path(), true).unwrap(),
            LockStatus::Stale { holder: Some(dead) }
        );
        assert!(!dir.path().join(LOCK_FILE).exists());
        assert_eq!(clear(dir.path(), true).unwrap(), LockStatus::Free);
    }

    #[test]
    fn reused_pid_is_not_alive() {
        let me = Holder::current();
        assert!(me.is_alive());
        let reused = Holder {
            proc_start_ticks: me.proc_start_ticks.map(|t| t + 1),
            ..me
        };
        assert!(!reused.is_alive());
    }

    #[test]
    fn holder_decoding_tolerates_garbage() {
        assert_eq!(Holder::decode(""), None);
        assert_eq!(Holder::decode("pid=abc\nstarted_at_ms=1\n"), None);
        let h = Holder::decode("pid=7\nstarted_at_ms=5\nextra=1\n").unwrap();
        assert_eq!((h.pid, h.proc_start_ticks), (7, None));
    }

    #[test]
    fn proc_locks_parsing() {
        let dev = nix::sys::stat::makedev(0x08, 0x01);
        let locks = "1: POSIX  ADVISORY  WRITE 99 08:01:42 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 1235 08:01:9999 0 EOF\n";
        assert!(flock_held_in(locks, dev, 5678));
        assert!(!flock_held_in(locks, dev, 42));
        assert!(!flock_held_in(locks, dev, 9999));
    }

    #[test]
    fn stat_parsing_handles_spaces_in_comm() {
        let stat = "42 (gstacks agent) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 777 1000 1";
        assert_eq!(parse_start_ticks(stat), Some(777));
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_795_439_449_000), "2026-11-23T13:10:49Z");
    }
}
