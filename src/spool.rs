//! Spool files: what a lax counter on Redis could not send when its worker
//! exited (nginx's fast shutdown, or Redis unreachable at the end of a
//! graceful one), written where the next start of nginx finds it and sends
//! it. Plain file handling; the format and the sending are the Lua side's
//! (`resty/counter/spool.lua`, docs/lax.md).
//!
//! A file appears whole or not at all: it is written under a temporary
//! name, synced, renamed into place, and the directory synced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The suffix of a finished spool file.
pub const SUFFIX: &str = ".spool";

/// Writes `content` as `dir/name` atomically, readable and writable by the
/// worker's user only (0600).
///
/// # Errors
///
/// Any error of the file system; the temporary file is removed then.
pub fn write(dir: &Path, name: &str, content: &[u8]) -> io::Result<()> {
    let temp = dir.join(format!(".{}.{}.tmp", name, std::process::id()));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(content)?;
        file.sync_all()?;
        fs::rename(&temp, dir.join(name))?;
        // The rename itself is durable once the directory is synced.
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// The names of the finished spool files in `dir` that start with
/// `prefix`, sorted.
///
/// # Errors
///
/// When `dir` cannot be read.
pub fn list(dir: &Path, prefix: &str) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        if let Ok(name) = entry?.file_name().into_string() {
            if name.starts_with(prefix) && name.ends_with(SUFFIX) {
                names.push(name);
            }
        }
    }
    names.sort();
    Ok(names)
}

/// When `dir` last changed (a file added, renamed or removed), as text
/// that differs whenever it did, and whether that was less than a second
/// ago: a worker lists the directory again only when the stamp differs or
/// is that recent (file times follow a coarse clock, so two changes a few
/// milliseconds apart may leave one stamp).
///
/// # Errors
///
/// When `dir` cannot be read.
pub fn stamp(dir: &Path) -> io::Result<(String, bool)> {
    let modified = fs::metadata(dir)?.modified()?;
    let recent = match SystemTime::now().duration_since(modified) {
        Ok(age) => age < Duration::from_secs(1),
        // In the future: the clock moved back; look again.
        Err(_) => true,
    };
    Ok((format!("{:?}", modified), recent))
}

/// Whether a file can be made in `dir` (by making and removing one).
///
/// # Errors
///
/// Why it cannot.
pub fn probe(dir: &Path) -> io::Result<()> {
    let path = dir.join(format!(".probe.{}.tmp", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    fs::remove_file(&path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("spool-{}-{}", tag, std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_written_file_is_whole_private_and_listed() {
        let dir = scratch("write");
        write(&dir, "lax-a-1.spool", b"one").unwrap();
        write(&dir, "lax-b-1.spool", b"two").unwrap();
        fs::write(dir.join("lax-a-2.spool.other"), b"x").unwrap();
        assert_eq!(fs::read(dir.join("lax-a-1.spool")).unwrap(), b"one");
        let mode = fs::metadata(dir.join("lax-a-1.spool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(list(&dir, "lax-a-").unwrap(), vec!["lax-a-1.spool"]);
        // No temporary file is left.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 3);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = scratch("missing").join("none");
        assert!(write(&dir, "x.spool", b"").is_err());
        assert!(list(&dir, "").is_err());
        assert!(stamp(&dir).is_err());
        assert!(probe(&dir).is_err());
    }

    #[test]
    fn the_stamp_changes_with_the_directory() {
        let dir = scratch("stamp");
        let (before, recent) = stamp(&dir).unwrap();
        assert!(recent);
        std::thread::sleep(Duration::from_millis(20));
        write(&dir, "x.spool", b"").unwrap();
        assert_ne!(stamp(&dir).unwrap().0, before);
        fs::remove_dir_all(&dir).unwrap();
    }
}
