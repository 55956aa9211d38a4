//! Files of a scratch folder that kiln opens on a cell's behalf (SQL results it writes, result
//! CSVs it reads), opened so that the cell cannot point them elsewhere.
//!
//! The cell controls everything inside its scratch folder, concurrently with kiln: it can put a
//! link where kiln expects a file, or swap a folder for a link between a check and an open. So
//! kiln never checks a path and then opens it: it walks from a descriptor of the scratch folder,
//! one component at a time with `openat(O_NOFOLLOW)`, and checks the file it holds (a regular
//! file with one link), never the name. A link anywhere on the way is refused, and a folder
//! swapped during the walk is either the one kiln already holds or is not followed.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

/// Reads at most `cap` bytes of the regular file `rel` inside `scratch`. Links, folders, FIFOs,
/// devices, hard links to other files, and paths leaving `scratch` are refused.
pub fn read_file(scratch: &Path, rel: &str, cap: usize) -> Result<Vec<u8>, String> {
    let (dir, name) = walk(scratch, rel, false)?;
    let fd = open_at(&dir, &name, libc::O_RDONLY | libc::O_NONBLOCK, rel)?;
    let file = regular(fd, rel)?;
    let mut bytes = Vec::new();
    file.take(cap as u64).read_to_end(&mut bytes).map_err(|e| format!("cannot read {rel}: {e}"))?;
    Ok(bytes)
}

/// Creates (or empties) the regular file `rel` inside `scratch` for writing, creating the
/// folders on the way. Refused like [`read_file`]: an existing link, FIFO or hard link is never
/// written through.
pub fn create_file(scratch: &Path, rel: &str) -> Result<File, String> {
    let (dir, name) = walk(scratch, rel, true)?;
    let fd = open_at(&dir, &name, libc::O_WRONLY | libc::O_CREAT | libc::O_NONBLOCK, rel)?;
    // Emptied only once it is known to be the cell's own regular file.
    let file = regular(fd, rel)?;
    file.set_len(0).map_err(|e| format!("cannot write {rel}: {e}"))?;
    Ok(file)
}

/// A descriptor of the folder that holds `rel` and the file's name in it.
fn walk(scratch: &Path, rel: &str, create: bool) -> Result<(OwnedFd, CString), String> {
    let path = Path::new(rel);
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            _ => return Err(format!("{rel:?} must be a relative path inside the working directory")),
        }
    }
    let Some(name) = parts.pop() else {
        return Err(format!("{rel:?} must be a relative path inside the working directory"));
    };
    let root = c_path(scratch.as_os_str().as_bytes(), rel)?;
    let directory = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: open with a valid C string; the result is checked.
    let mut dir = owned(unsafe { libc::open(root.as_ptr(), directory) })
        .map_err(|e| format!("cannot open the working directory: {e}"))?;
    for part in parts {
        let part = c_path(part.as_bytes(), rel)?;
        if create {
            // SAFETY: mkdirat on a descriptor this function owns; EEXIST is fine.
            unsafe { libc::mkdirat(dir.as_raw_fd(), part.as_ptr(), 0o755) };
        }
        // SAFETY: openat on an owned descriptor with a valid C string; the result is checked.
        let next = unsafe { libc::openat(dir.as_raw_fd(), part.as_ptr(), directory | libc::O_NOFOLLOW) };
        dir = owned(next).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                format!(
                    "{rel:?} leads through a link or a file: only folders inside the working directory are followed"
                )
            }
            _ => format!("cannot open the folder of {rel:?}: {e}"),
        })?;
    }
    Ok((dir, c_path(name.as_bytes(), rel)?))
}

fn open_at(dir: &OwnedFd, name: &CString, flags: i32, rel: &str) -> Result<OwnedFd, String> {
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: openat on an owned descriptor with a valid C string; the result is checked.
    owned(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o644 as libc::c_uint) }).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::ELOOP) => format!("{rel:?} is a link: only regular files inside the working directory are used"),
            Some(libc::ENXIO) => format!("{rel:?} is not a regular file"),
            _ => format!("cannot open {rel:?}: {e}"),
        }
    })
}

/// The open file, if it is a regular file with a single name (a hard link could be a file
/// outside the scratch folder).
fn regular(fd: OwnedFd, rel: &str) -> Result<File, String> {
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| format!("cannot inspect {rel:?}: {e}"))?;
    use std::os::unix::fs::MetadataExt;
    if !meta.file_type().is_file() {
        return Err(format!("{rel:?} is not a regular file"));
    }
    if meta.nlink() > 1 {
        return Err(format!("{rel:?} has other names (a hard link): only the cell's own files are used"));
    }
    Ok(file)
}

fn c_path(bytes: &[u8], rel: &str) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| format!("{rel:?} holds a NUL character"))
}

fn owned(fd: i32) -> std::io::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by the kernel, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn files_inside_are_read_and_written() {
        let dir = tempfile::tempdir().unwrap();
        create_file(dir.path(), "sub/deeper/r.csv").unwrap().write_all(b"a,b\n1,2\n").unwrap();
        assert_eq!(read_file(dir.path(), "sub/deeper/r.csv", 100).unwrap(), b"a,b\n1,2\n");
        assert_eq!(read_file(dir.path(), "sub/deeper/r.csv", 4).unwrap(), b"a,b\n", "capped");
        create_file(dir.path(), "sub/deeper/r.csv").unwrap().write_all(b"x").unwrap();
        assert_eq!(read_file(dir.path(), "sub/deeper/r.csv", 100).unwrap(), b"x", "emptied first");
    }

    #[test]
    fn links_and_paths_out_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.txt");
        std::fs::write(&secret, "secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&secret, dir.path().join("link.csv")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::fs::hard_link(&secret, dir.path().join("hard.csv")).unwrap();
        for rel in ["link.csv", "out/secret.txt", "hard.csv", "../x.csv", "/etc/passwd", ""] {
            assert!(read_file(dir.path(), rel, 100).is_err(), "read {rel}");
        }
        for rel in ["link.csv", "out/new.csv", "hard.csv", "../x.csv", "/tmp/x.csv"] {
            assert!(create_file(dir.path(), rel).is_err(), "write {rel}");
        }
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "secret", "never emptied through a link");
        assert!(!outside.path().join("new.csv").exists());
    }

    #[test]
    fn fifos_and_folders_are_not_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("folder.csv")).unwrap();
        let fifo = CString::new(dir.path().join("pipe.csv").as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        for rel in ["folder.csv", "pipe.csv"] {
            assert!(read_file(dir.path(), rel, 100).is_err(), "read {rel}");
            assert!(create_file(dir.path(), rel).is_err(), "write {rel}");
        }
    }
}
