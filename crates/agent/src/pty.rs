//! Pseudo-terminals for SSH sessions that ask for one: a master the agent reads and writes without
//! blocking, and a child started as a session leader with the terminal as its controlling terminal.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;

use rustix::fs::{Mode, OFlags};
use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use rustix::termios::{tcsetwinsize, Winsize};
use tokio::io::unix::AsyncFd;
use tokio::process::Command;

/// The agent's end of a terminal.
#[derive(Clone)]
pub(crate) struct Master(Arc<AsyncFd<File>>);

/// Opens a terminal of `cols` × `rows`: its master and the child's end.
pub(crate) fn open(cols: u16, rows: u16) -> io::Result<(Master, OwnedFd)> {
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let child = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::io::ioctl_fionbio(&master, true)?;
    let file = File::from(master);
    #[allow(unsafe_code)]
    // SAFETY: the `File` owns the descriptor and moves into the `AsyncFd`, so the descriptor stays open
    // and the same for as long as it is registered.
    let registered = unsafe { AsyncFd::register(file) }.map_err(io::Error::from)?;
    let master = Master(Arc::new(registered));
    master.resize(cols, rows);
    Ok((master, child))
}

impl Master {
    /// Tells the terminal (and so the program in it, by SIGWINCH) its new size.
    pub(crate) fn resize(&self, cols: u16, rows: u16) {
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let _ = tcsetwinsize(self.0.get_ref().as_fd(), size);
    }

    /// Reads what the program wrote; 0 once every end of the terminal is closed.
    pub(crate) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|f| f.get_ref().read(buf)) {
                Ok(Ok(n)) => return Ok(n),
                // Linux answers EIO once the last process holding the terminal has closed it.
                Ok(Err(e)) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
                    return Ok(0)
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `buf` to the program's input.
    pub(crate) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut ready = self.0.writable().await?;
            match ready.try_io(|f| f.get_ref().write(buf)) {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Makes `cmd` run on the terminal whose child end is `tty`: as its standard streams, in a new session,
/// with the terminal as its controlling terminal.
pub(crate) fn attach(cmd: &mut Command, tty: &OwnedFd) -> io::Result<()> {
    cmd.stdin(Stdio::from(tty.try_clone()?))
        .stdout(Stdio::from(tty.try_clone()?))
        .stderr(Stdio::from(tty.try_clone()?));
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only makes two system calls
    // (setsid, ioctl), which are async-signal-safe; it allocates nothing and touches no shared state.
    // By then standard input is the terminal, so descriptor 0 is valid for the ioctl.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(std::os::fd::BorrowedFd::borrow_raw(0))?;
            Ok(())
        });
    }
    Ok(())
}
