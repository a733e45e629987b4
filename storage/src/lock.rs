//! The data directory's lock: one store (one broker) per data directory.
//!
//! `<data_dir>/LOCK` is locked with `flock(LOCK_EX | LOCK_NB)` for as long as
//! the store is open and holds the owner's process id as text, so that a
//! second broker on the same directory is told which process has it. The
//! kernel drops the lock when the process dies (kill -9 included): a stale
//! file never blocks a restart.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Holds the data directory's lock until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Locks `dir` (which must exist).
    ///
    /// # Errors
    /// [`Error::DataDirInUse`] when another open store (in this process or
    /// another) holds it; [`Error::Io`] when the file cannot be opened,
    /// locked or written.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(Error::DataDirInUse {
                    dir: PathBuf::from(dir),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(e) => return Err(Error::io("flock", &path, e.into())),
        }
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        written.map_err(|e| Error::io("write", &path, e))?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_owner_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        match DirLock::acquire(dir.path()) {
            Err(Error::DataDirInUse { dir: d, pid }) => {
                assert_eq!(d, dir.path());
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected DataDirInUse, got {other:?}"),
        }
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
