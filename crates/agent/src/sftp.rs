//! An SFTP server (protocol version 3, as OpenSSH's `sftp-server` speaks it, with its `posix-rename`,
//! `hardlink`, `fsync`, `limits` and `expand-path` extensions), run on an SSH channel's `sftp` subsystem so
//! that `scp`, `sftp` and `rsync`-over-sftp tools work against a workspace.
//!
//! The server is synchronous: it reads a request, performs it on the workspace's file system, writes the
//! answer. Every packet from the client is untrusted: [`decode`] parses one and refuses what does not fit
//! (the fuzz target `sftp_decode` drives it), and a bad packet is answered with `SSH_FX_BAD_MESSAGE`
//! instead of ending the session, unless its length cannot be trusted.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The largest packet the server reads or writes (the length field excluded).
pub const MAX_PACKET: u32 = 256 * 1024;
/// The most bytes one READ answers or one WRITE carries, leaving room for the packet's header.
pub const MAX_IO: u32 = MAX_PACKET - 1024;
/// Open file and directory handles per session.
const MAX_HANDLES: usize = 1024;
/// Names per READDIR answer.
const READDIR_BATCH: usize = 128;

// Packet types (draft-ietf-secsh-filexfer-02).
const INIT: u8 = 1;
const VERSION: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const WRITE: u8 = 6;
const LSTAT: u8 = 7;
const FSTAT: u8 = 8;
const SETSTAT: u8 = 9;
const FSETSTAT: u8 = 10;
const OPENDIR: u8 = 11;
const READDIR: u8 = 12;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const RMDIR: u8 = 15;
const REALPATH: u8 = 16;
const STAT: u8 = 17;
const RENAME: u8 = 18;
const READLINK: u8 = 19;
const SYMLINK: u8 = 20;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;
const NAME: u8 = 104;
const ATTRS: u8 = 105;
const EXTENDED: u8 = 200;
const EXTENDED_REPLY: u8 = 201;

// Status codes.
const FX_OK: u32 = 0;
const FX_EOF: u32 = 1;
const FX_NO_SUCH_FILE: u32 = 2;
const FX_PERMISSION_DENIED: u32 = 3;
const FX_FAILURE: u32 = 4;
const FX_BAD_MESSAGE: u32 = 5;
const FX_OP_UNSUPPORTED: u32 = 8;

// Attribute flags.
const ATTR_SIZE: u32 = 0x1;
const ATTR_UIDGID: u32 = 0x2;
const ATTR_PERMISSIONS: u32 = 0x4;
const ATTR_ACMODTIME: u32 = 0x8;
const ATTR_EXTENDED: u32 = 0x8000_0000;

// Open flags.
const OPEN_READ: u32 = 0x1;
const OPEN_WRITE: u32 = 0x2;
const OPEN_APPEND: u32 = 0x4;
const OPEN_CREAT: u32 = 0x8;
const OPEN_TRUNC: u32 = 0x10;
const OPEN_EXCL: u32 = 0x20;

/// The extensions the server announces, with their versions.
const EXTENSIONS: &[(&str, &str)] = &[
    ("posix-rename@openssh.com", "1"),
    ("hardlink@openssh.com", "1"),
    ("fsync@openssh.com", "1"),
    ("limits@openssh.com", "1"),
    ("expand-path@openssh.com", "1"),
];

/// File attributes as the protocol carries them; absent fields are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs {
    pub size: Option<u64>,
    pub uid_gid: Option<(u32, u32)>,
    pub permissions: Option<u32>,
    /// Access and modification time, seconds since the epoch.
    pub times: Option<(u32, u32)>,
}

/// One request from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Init {
        version: u32,
    },
    Open {
        path: String,
        flags: u32,
        attrs: Attrs,
    },
    Close {
        handle: Vec<u8>,
    },
    Read {
        handle: Vec<u8>,
        offset: u64,
        len: u32,
    },
    Write {
        handle: Vec<u8>,
        offset: u64,
        data: Vec<u8>,
    },
    Lstat {
        path: String,
    },
    Fstat {
        handle: Vec<u8>,
    },
    Setstat {
        path: String,
        attrs: Attrs,
    },
    Fsetstat {
        handle: Vec<u8>,
        attrs: Attrs,
    },
    Opendir {
        path: String,
    },
    Readdir {
        handle: Vec<u8>,
    },
    Remove {
        path: String,
    },
    Mkdir {
        path: String,
        attrs: Attrs,
    },
    Rmdir {
        path: String,
    },
    Realpath {
        path: String,
    },
    Stat {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
    Readlink {
        path: String,
    },
    /// OpenSSH sends the link's target first and the link's path second.
    Symlink {
        target: String,
        link: String,
    },
    PosixRename {
        from: String,
        to: String,
    },
    Hardlink {
        from: String,
        to: String,
    },
    Fsync {
        handle: Vec<u8>,
    },
    Limits,
    ExpandPath {
        path: String,
    },
    /// An extension the server does not implement.
    Extended {
        name: String,
    },
}

/// Why a packet could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A cursor over a packet's bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError(format!(
                "{what}: needs {n} bytes, {} left",
                self.0.len()
            )));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn bytes(&mut self, what: &str) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes(what)?)
            .map_err(|_| DecodeError(format!("{what} is not UTF-8")))
    }

    fn attrs(&mut self) -> Result<Attrs, DecodeError> {
        let flags = self.u32("attrs flags")?;
        let mut a = Attrs::default();
        if flags & ATTR_SIZE != 0 {
            a.size = Some(self.u64("attrs size")?);
        }
        if flags & ATTR_UIDGID != 0 {
            a.uid_gid = Some((self.u32("attrs uid")?, self.u32("attrs gid")?));
        }
        if flags & ATTR_PERMISSIONS != 0 {
            a.permissions = Some(self.u32("attrs permissions")?);
        }
        if flags & ATTR_ACMODTIME != 0 {
            a.times = Some((self.u32("attrs atime")?, self.u32("attrs mtime")?));
        }
        if flags & ATTR_EXTENDED != 0 {
            let n = self.u32("attrs extended count")?;
            for _ in 0..n {
                self.bytes("attrs extended type")?;
                self.bytes("attrs extended data")?;
            }
        }
        Ok(a)
    }
}

/// Decodes one packet (its length already removed): the request id (0 for INIT) and the request.
pub fn decode(packet: &[u8]) -> Result<(u32, Request), DecodeError> {
    let mut r = Reader(packet);
    let kind = r.u8("packet type")?;
    if kind == INIT {
        return Ok((
            0,
            Request::Init {
                version: r.u32("version")?,
            },
        ));
    }
    let id = r.u32("request id")?;
    let req = match kind {
        OPEN => Request::Open {
            path: r.string("filename")?,
            flags: r.u32("pflags")?,
            attrs: r.attrs()?,
        },
        CLOSE => Request::Close {
            handle: r.bytes("handle")?,
        },
        READ => Request::Read {
            handle: r.bytes("handle")?,
            offset: r.u64("offset")?,
            len: r.u32("len")?,
        },
        WRITE => Request::Write {
            handle: r.bytes("handle")?,
            offset: r.u64("offset")?,
            data: r.bytes("data")?,
        },
        LSTAT => Request::Lstat {
            path: r.string("path")?,
        },
        FSTAT => Request::Fstat {
            handle: r.bytes("handle")?,
        },
        SETSTAT => Request::Setstat {
            path: r.string("path")?,
            attrs: r.attrs()?,
        },
        FSETSTAT => Request::Fsetstat {
            handle: r.bytes("handle")?,
            attrs: r.attrs()?,
        },
        OPENDIR => Request::Opendir {
            path: r.string("path")?,
        },
        READDIR => Request::Readdir {
            handle: r.bytes("handle")?,
        },
        REMOVE => Request::Remove {
            path: r.string("filename")?,
        },
        MKDIR => Request::Mkdir {
            path: r.string("path")?,
            attrs: r.attrs()?,
        },
        RMDIR => Request::Rmdir {
            path: r.string("path")?,
        },
        REALPATH => Request::Realpath {
            path: r.string("path")?,
        },
        STAT => Request::Stat {
            path: r.string("path")?,
        },
        RENAME => Request::Rename {
            from: r.string("oldpath")?,
            to: r.string("newpath")?,
        },
        READLINK => Request::Readlink {
            path: r.string("path")?,
        },
        SYMLINK => Request::Symlink {
            target: r.string("targetpath")?,
            link: r.string("linkpath")?,
        },
        EXTENDED => {
            let name = r.string("extended request")?;
            match name.as_str() {
                "posix-rename@openssh.com" => Request::PosixRename {
                    from: r.string("oldpath")?,
                    to: r.string("newpath")?,
                },
                "hardlink@openssh.com" => Request::Hardlink {
                    from: r.string("oldpath")?,
                    to: r.string("newpath")?,
                },
                "fsync@openssh.com" => Request::Fsync {
                    handle: r.bytes("handle")?,
                },
                "limits@openssh.com" => Request::Limits,
                "expand-path@openssh.com" => Request::ExpandPath {
                    path: r.string("path")?,
                },
                _ => Request::Extended { name },
            }
        }
        other => return Err(DecodeError(format!("unknown packet type {other}"))),
    };
    Ok((id, req))
}

/// An answer being built: type, then fields.
struct Out(Vec<u8>);

impl Out {
    fn new(kind: u8, id: Option<u32>) -> Out {
        let mut o = Out(Vec::with_capacity(64));
        o.0.push(kind);
        if let Some(id) = id {
            o.u32(id);
        }
        o
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        // Every answer is built from data the server bounds below `MAX_PACKET`.
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(b);
    }
    fn attrs(&mut self, m: &fs::Metadata) {
        self.u32(ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME);
        self.u64(m.size());
        self.u32(m.uid());
        self.u32(m.gid());
        self.u32(m.mode());
        self.u32(clamp_time(m.atime()));
        self.u32(clamp_time(m.mtime()));
    }
}

fn clamp_time(t: i64) -> u32 {
    u32::try_from(t.max(0)).unwrap_or(u32::MAX)
}

fn status(id: u32, code: u32, message: &str) -> Out {
    let mut o = Out::new(STATUS, Some(id));
    o.u32(code);
    o.bytes(message.as_bytes());
    o.bytes(b"en");
    o
}

fn io_status(id: u32, e: &io::Error) -> Out {
    let code = match e.kind() {
        io::ErrorKind::NotFound => FX_NO_SUCH_FILE,
        io::ErrorKind::PermissionDenied => FX_PERMISSION_DENIED,
        _ => FX_FAILURE,
    };
    status(id, code, &e.to_string())
}

enum Handle {
    File(File),
    /// A directory's entries, read when it was opened, handed out in batches.
    Dir {
        path: PathBuf,
        left: Vec<String>,
    },
}

/// One SFTP session's state.
pub struct Server {
    home: PathBuf,
    handles: HashMap<u32, Handle>,
    next_handle: u32,
}

impl Server {
    /// A session whose relative paths start at `home`.
    pub fn new(home: PathBuf) -> Server {
        Server {
            home,
            handles: HashMap::new(),
            next_handle: 1,
        }
    }

    /// Serves requests from `input` until it ends; answers go to `output`.
    pub fn run(&mut self, mut input: impl Read, mut output: impl Write) -> io::Result<()> {
        let mut buf = Vec::new();
        loop {
            let mut len = [0u8; 4];
            match input.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let len = u32::from_be_bytes(len);
            if len == 0 || len > MAX_PACKET {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("an SFTP packet of {len} bytes (at most {MAX_PACKET})"),
                ));
            }
            buf.resize(len as usize, 0);
            input.read_exact(&mut buf)?;
            let answer = self.answer(&buf);
            output.write_all(&(answer.0.len() as u32).to_be_bytes())?;
            output.write_all(&answer.0)?;
            output.flush()?;
        }
    }

    /// The answer to one packet.
    fn answer(&mut self, packet: &[u8]) -> Out {
        match decode(packet) {
            Ok((id, req)) => self.handle(id, req),
            Err(e) => {
                // The id is wherever it would be; a packet too short for one gets 0.
                let id = packet
                    .get(1..5)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                status(id, FX_BAD_MESSAGE, &e.0)
            }
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.home.join(p)
        }
    }

    fn new_handle(&mut self, id: u32, h: Handle) -> Out {
        if self.handles.len() >= MAX_HANDLES {
            return status(
                id,
                FX_FAILURE,
                &format!("too many open handles (at most {MAX_HANDLES})"),
            );
        }
        let n = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1).max(1);
        self.handles.insert(n, h);
        let mut o = Out::new(HANDLE, Some(id));
        o.bytes(n.to_string().as_bytes());
        o
    }

    fn lookup(&mut self, handle: &[u8]) -> Option<&mut Handle> {
        let n: u32 = std::str::from_utf8(handle).ok()?.parse().ok()?;
        self.handles.get_mut(&n)
    }

    fn file(&mut self, id: u32, handle: &[u8]) -> Result<&mut File, Out> {
        match self.lookup(handle) {
            Some(Handle::File(f)) => Ok(f),
            Some(Handle::Dir { .. }) => Err(status(id, FX_FAILURE, "the handle is a directory")),
            None => Err(status(id, FX_FAILURE, "no such handle")),
        }
    }

    fn done(id: u32, r: io::Result<()>) -> Out {
        match r {
            Ok(()) => status(id, FX_OK, "OK"),
            Err(e) => io_status(id, &e),
        }
    }

    fn handle(&mut self, id: u32, req: Request) -> Out {
        match req {
            Request::Init { .. } => {
                let mut o = Out::new(VERSION, None);
                o.u32(3);
                for (name, version) in EXTENSIONS {
                    o.bytes(name.as_bytes());
                    o.bytes(version.as_bytes());
                }
                o
            }
            Request::Open { path, flags, attrs } => {
                let mut opts = OpenOptions::new();
                opts.read(flags & OPEN_READ != 0)
                    .write(flags & (OPEN_WRITE | OPEN_APPEND) != 0)
                    .append(flags & OPEN_APPEND != 0)
                    .truncate(flags & OPEN_TRUNC != 0);
                if flags & OPEN_CREAT != 0 {
                    if flags & OPEN_EXCL != 0 {
                        opts.create_new(true);
                    } else {
                        opts.create(true);
                    }
                }
                opts.mode(attrs.permissions.map_or(0o666, |m| m & 0o7777));
                match opts.open(self.path(&path)) {
                    Ok(f) => self.new_handle(id, Handle::File(f)),
                    Err(e) => io_status(id, &e),
                }
            }
            Request::Close { handle } => {
                let n = std::str::from_utf8(&handle)
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok());
                match n.and_then(|n| self.handles.remove(&n)) {
                    Some(_) => status(id, FX_OK, "OK"),
                    None => status(id, FX_FAILURE, "no such handle"),
                }
            }
            Request::Read {
                handle,
                offset,
                len,
            } => {
                let f = match self.file(id, &handle) {
                    Ok(f) => f,
                    Err(o) => return o,
                };
                let mut buf = vec![0u8; len.min(MAX_IO) as usize];
                let mut filled = 0;
                // A short read is not the end of the file; read until the buffer is full or it is.
                while filled < buf.len() {
                    match f.read_at(&mut buf[filled..], offset + filled as u64) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return io_status(id, &e),
                    }
                }
                if filled == 0 && len > 0 {
                    return status(id, FX_EOF, "end of file");
                }
                let mut o = Out::new(DATA, Some(id));
                o.bytes(&buf[..filled]);
                o
            }
            Request::Write {
                handle,
                offset,
                data,
            } => match self.file(id, &handle) {
                Ok(f) => Self::done(id, f.write_all_at(&data, offset)),
                Err(o) => o,
            },
            Request::Lstat { path } => self.stat(id, fs::symlink_metadata(self.path(&path))),
            Request::Stat { path } => self.stat(id, fs::metadata(self.path(&path))),
            Request::Fstat { handle } => match self.file(id, &handle) {
                Ok(f) => {
                    let m = f.metadata();
                    self.stat(id, m)
                }
                Err(o) => o,
            },
            Request::Setstat { path, attrs } => {
                let p = self.path(&path);
                Self::done(id, set_attrs(&p, None, &attrs))
            }
            Request::Fsetstat { handle, attrs } => match self.file(id, &handle) {
                Ok(f) => {
                    let f = f.try_clone();
                    Self::done(
                        id,
                        f.and_then(|f| set_attrs(Path::new(""), Some(&f), &attrs)),
                    )
                }
                Err(o) => o,
            },
            Request::Opendir { path } => {
                let p = self.path(&path);
                let entries = fs::read_dir(&p).and_then(|rd| {
                    rd.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect::<io::Result<Vec<String>>>()
                });
                match entries {
                    Ok(mut left) => {
                        left.push("..".into());
                        left.push(".".into());
                        self.new_handle(id, Handle::Dir { path: p, left })
                    }
                    Err(e) => io_status(id, &e),
                }
            }
            Request::Readdir { handle } => {
                let (dir, batch) = match self.lookup(&handle) {
                    Some(Handle::Dir { path, left }) => {
                        let n = left.len().saturating_sub(READDIR_BATCH);
                        (path.clone(), left.split_off(n))
                    }
                    Some(Handle::File(_)) => {
                        return status(id, FX_FAILURE, "the handle is not a directory")
                    }
                    None => return status(id, FX_FAILURE, "no such handle"),
                };
                if batch.is_empty() {
                    return status(id, FX_EOF, "no more entries");
                }
                let mut names = Vec::with_capacity(batch.len());
                for name in batch.into_iter().rev() {
                    // An entry removed since the directory was opened is left out.
                    if let Ok(m) = fs::symlink_metadata(dir.join(&name)) {
                        names.push((name, m));
                    }
                }
                let mut o = Out::new(NAME, Some(id));
                o.u32(names.len() as u32);
                for (name, m) in &names {
                    o.bytes(name.as_bytes());
                    o.bytes(long_name(name, m).as_bytes());
                    o.attrs(m);
                }
                o
            }
            Request::Remove { path } => Self::done(id, fs::remove_file(self.path(&path))),
            Request::Mkdir { path, attrs } => {
                let p = self.path(&path);
                let mut b = fs::DirBuilder::new();
                std::os::unix::fs::DirBuilderExt::mode(
                    &mut b,
                    attrs.permissions.map_or(0o777, |m| m & 0o7777),
                );
                Self::done(id, b.create(p))
            }
            Request::Rmdir { path } => Self::done(id, fs::remove_dir(self.path(&path))),
            Request::Realpath { path } => {
                let p = if path.is_empty() { ".".into() } else { path };
                self.name_of(id, &self.path(&p))
            }
            Request::ExpandPath { path } => {
                let p = if path == "~" {
                    self.home.clone()
                } else if let Some(rest) = path.strip_prefix("~/") {
                    self.home.join(rest)
                } else if path.is_empty() {
                    self.home.clone()
                } else {
                    self.path(&path)
                };
                self.name_of(id, &p)
            }
            Request::Rename { from, to } => {
                let (from, to) = (self.path(&from), self.path(&to));
                if fs::symlink_metadata(&to).is_ok() {
                    return status(id, FX_FAILURE, "the target already exists");
                }
                Self::done(id, fs::rename(from, to))
            }
            Request::PosixRename { from, to } => {
                Self::done(id, fs::rename(self.path(&from), self.path(&to)))
            }
            Request::Hardlink { from, to } => {
                Self::done(id, fs::hard_link(self.path(&from), self.path(&to)))
            }
            Request::Readlink { path } => match fs::read_link(self.path(&path)) {
                Ok(target) => {
                    let mut o = Out::new(NAME, Some(id));
                    o.u32(1);
                    let t = target.to_string_lossy();
                    o.bytes(t.as_bytes());
                    o.bytes(t.as_bytes());
                    o.u32(0);
                    o
                }
                Err(e) => io_status(id, &e),
            },
            Request::Symlink { target, link } => {
                Self::done(id, std::os::unix::fs::symlink(target, self.path(&link)))
            }
            Request::Fsync { handle } => match self.file(id, &handle) {
                Ok(f) => Self::done(id, f.sync_all()),
                Err(o) => o,
            },
            Request::Limits => {
                let mut o = Out::new(EXTENDED_REPLY, Some(id));
                o.u64(u64::from(MAX_PACKET));
                o.u64(u64::from(MAX_IO));
                o.u64(u64::from(MAX_IO));
                o.u64(MAX_HANDLES as u64);
                o
            }
            Request::Extended { name } => status(
                id,
                FX_OP_UNSUPPORTED,
                &format!("the extension {name:?} is not supported"),
            ),
        }
    }

    fn stat(&self, id: u32, m: io::Result<fs::Metadata>) -> Out {
        match m {
            Ok(m) => {
                let mut o = Out::new(ATTRS, Some(id));
                o.attrs(&m);
                o
            }
            Err(e) => io_status(id, &e),
        }
    }

    /// A NAME answer with the absolute, normalized form of `p` (resolving links where it exists).
    fn name_of(&self, id: u32, p: &Path) -> Out {
        let resolved = fs::canonicalize(p).unwrap_or_else(|_| normalize(p));
        let s = resolved.to_string_lossy();
        let mut o = Out::new(NAME, Some(id));
        o.u32(1);
        o.bytes(s.as_bytes());
        o.bytes(s.as_bytes());
        match fs::metadata(&resolved) {
            Ok(m) => o.attrs(&m),
            Err(_) => o.u32(0),
        }
        o
    }
}

/// Removes `.` and resolves `..` without looking at the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Applies attributes to a path, or to an open file when one is given.
fn set_attrs(path: &Path, file: Option<&File>, a: &Attrs) -> io::Result<()> {
    if let Some(size) = a.size {
        match file {
            Some(f) => f.set_len(size)?,
            None => OpenOptions::new().write(true).open(path)?.set_len(size)?,
        }
    }
    if let Some(mode) = a.permissions {
        let perms = fs::Permissions::from_mode(mode & 0o7777);
        match file {
            Some(f) => f.set_permissions(perms)?,
            None => fs::set_permissions(path, perms)?,
        }
    }
    if let Some((uid, gid)) = a.uid_gid {
        match file {
            Some(f) => std::os::unix::fs::fchown(f, Some(uid), Some(gid))?,
            None => std::os::unix::fs::chown(path, Some(uid), Some(gid))?,
        }
    }
    if let Some((atime, mtime)) = a.times {
        let at = |s: u32| UNIX_EPOCH + Duration::from_secs(u64::from(s));
        let times = fs::FileTimes::new()
            .set_accessed(at(atime))
            .set_modified(at(mtime));
        match file {
            Some(f) => f.set_times(times)?,
            None => File::open(path)?.set_times(times)?,
        }
    }
    Ok(())
}

/// An `ls -l` line, which `sftp`'s `ls -l` prints as it is.
fn long_name(name: &str, m: &fs::Metadata) -> String {
    let mode = m.mode();
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o140000 => 's',
        _ => '-',
    };
    let mut perms = String::with_capacity(10);
    perms.push(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        perms.push(if bits & 4 != 0 { 'r' } else { '-' });
        perms.push(if bits & 2 != 0 { 'w' } else { '-' });
        perms.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    let mtime = UNIX_EPOCH + Duration::from_secs(u64::try_from(m.mtime()).unwrap_or(0));
    format!(
        "{perms} {:>4} {:<8} {:<8} {:>12} {} {name}",
        m.nlink(),
        m.uid(),
        m.gid(),
        m.size(),
        ls_date(mtime),
    )
}

/// `Mon DD HH:MM` (UTC) as `ls` shows a recent file, from days since the epoch (Howard Hinnant's
/// civil-from-days algorithm).
fn ls_date(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    format!(
        "{} {day:>2} {:02}:{:02}",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// The properties the `sftp_decode` fuzz target checks, public so the agent's tests run them on stable too.
pub mod fuzzing {
    use super::*;

    /// Decoding never panics; whatever decodes takes no more bytes than the packet has, and a packet that
    /// does not decode is answered with a well-formed `SSH_FX_BAD_MESSAGE` status (without touching any
    /// file: only a decoded request reaches the file system).
    pub fn check(packet: &[u8]) {
        match decode(packet) {
            Ok((_, req)) => {
                let carried = match &req {
                    Request::Write { data, handle, .. } => data.len() + handle.len(),
                    Request::Open { path, .. } | Request::Stat { path } => path.len(),
                    _ => 0,
                };
                assert!(carried <= packet.len());
                assert_eq!(decode(packet).ok().map(|(_, r)| r), Some(req));
            }
            Err(_) => {
                let answer = Server::new(PathBuf::from("/nonexistent")).answer(packet);
                assert_eq!(answer.0[0], STATUS);
                assert_eq!(answer.0[5..9], FX_BAD_MESSAGE.to_be_bytes());
                assert!(answer.0.len() < MAX_PACKET as usize);
            }
        }
    }

    /// One valid packet of each kind the server reads: the fuzz target's seeds and the stable mutations'.
    pub fn seeds() -> Vec<Vec<u8>> {
        fn s(v: &str) -> Vec<u8> {
            let mut b = (v.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(v.as_bytes());
            b
        }
        let id = 7u32.to_be_bytes().to_vec();
        let attrs = [
            (ATTR_SIZE | ATTR_PERMISSIONS | ATTR_ACMODTIME | ATTR_EXTENDED)
                .to_be_bytes()
                .to_vec(),
            9u64.to_be_bytes().to_vec(),
            0o644u32.to_be_bytes().to_vec(),
            1u32.to_be_bytes().to_vec(),
            2u32.to_be_bytes().to_vec(),
            1u32.to_be_bytes().to_vec(),
            s("x@y"),
            s("z"),
        ]
        .concat();
        let p = |kind: u8, fields: &[&[u8]]| {
            let mut v = vec![kind];
            v.extend_from_slice(&id);
            for f in fields {
                v.extend_from_slice(f);
            }
            v
        };
        vec![
            vec![INIT, 0, 0, 0, 3],
            p(
                OPEN,
                &[
                    &s("a/b.txt"),
                    &(OPEN_READ | OPEN_CREAT).to_be_bytes(),
                    &attrs,
                ],
            ),
            p(
                READ,
                &[&s("1"), &5u64.to_be_bytes(), &4096u32.to_be_bytes()],
            ),
            p(WRITE, &[&s("1"), &0u64.to_be_bytes(), &s("data")]),
            p(SETSTAT, &[&s("f"), &attrs]),
            p(RENAME, &[&s("a"), &s("b")]),
            p(SYMLINK, &[&s("target"), &s("link")]),
            p(
                EXTENDED,
                &[&s("posix-rename@openssh.com"), &s("a"), &s("b")],
            ),
            p(EXTENDED, &[&s("limits@openssh.com")]),
            p(EXTENDED, &[&s("expand-path@openssh.com"), &s("~/x")]),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, id: u32, fields: &[&[u8]]) -> Vec<u8> {
        let mut p = vec![kind];
        p.extend_from_slice(&id.to_be_bytes());
        for f in fields {
            p.extend_from_slice(f);
        }
        p
    }

    fn s(v: &str) -> Vec<u8> {
        let mut b = (v.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(v.as_bytes());
        b
    }

    #[test]
    fn truncated_and_unknown_packets_are_refused_with_what_is_missing() {
        assert_eq!(
            decode(&[OPEN, 0, 0, 0, 1, 0, 0, 0, 9, b'a']).unwrap_err().0,
            "filename: needs 9 bytes, 1 left"
        );
        assert_eq!(
            decode(&[99, 0, 0, 0, 1]).unwrap_err().0,
            "unknown packet type 99"
        );
        assert_eq!(
            decode(&[]).unwrap_err().0,
            "packet type: needs 1 bytes, 0 left"
        );
        let mut server = Server::new(std::env::temp_dir());
        let answer = server.answer(&[REMOVE, 0, 0, 0, 7]);
        assert_eq!(answer.0[0], STATUS);
        assert_eq!(&answer.0[1..5], &7u32.to_be_bytes());
        assert_eq!(&answer.0[5..9], &FX_BAD_MESSAGE.to_be_bytes());
    }

    #[test]
    fn files_are_written_read_listed_and_renamed_relative_to_home() {
        let home = tempfile::tempdir().unwrap();
        let mut server = Server::new(home.path().to_path_buf());
        let open = packet(
            OPEN,
            1,
            &[
                &s("a.txt"),
                &(OPEN_WRITE | OPEN_CREAT | OPEN_TRUNC).to_be_bytes(),
                &0u32.to_be_bytes(),
            ],
        );
        let h = server.answer(&open);
        assert_eq!(h.0[0], HANDLE, "{:?}", h.0);
        let handle = Reader(&h.0[5..]).bytes("handle").unwrap();
        let mut hs = (handle.len() as u32).to_be_bytes().to_vec();
        hs.extend_from_slice(&handle);
        let write = packet(WRITE, 2, &[&hs, &3u64.to_be_bytes(), &s("hello")]);
        assert_eq!(&server.answer(&write).0[5..9], &FX_OK.to_be_bytes());
        server.answer(&packet(CLOSE, 3, &[&hs]));
        assert_eq!(fs::read(home.path().join("a.txt")).unwrap(), b"\0\0\0hello");
        let rename = packet(RENAME, 4, &[&s("a.txt"), &s("b.txt")]);
        assert_eq!(&server.answer(&rename).0[5..9], &FX_OK.to_be_bytes());
        let again = packet(RENAME, 5, &[&s("b.txt"), &s("b.txt")]);
        assert_eq!(&server.answer(&again).0[5..9], &FX_FAILURE.to_be_bytes());
        let real = server.answer(&packet(REALPATH, 6, &[&s("x/../b.txt")]));
        assert_eq!(real.0[0], NAME);
        let name = Reader(&real.0[9..]).string("name").unwrap();
        assert_eq!(
            name,
            fs::canonicalize(home.path().join("b.txt"))
                .unwrap()
                .to_string_lossy()
        );
        let missing = server.answer(&packet(STAT, 7, &[&s("nope")]));
        assert_eq!(&missing.0[5..9], &FX_NO_SUCH_FILE.to_be_bytes());
    }

    #[test]
    fn mutated_packets_never_panic_the_decoder() {
        let mut state = 0x2545_f491_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for seed in fuzzing::seeds() {
            assert!(decode(&seed).is_ok(), "seed {seed:?}");
            for cut in 0..seed.len() {
                fuzzing::check(&seed[..cut]);
            }
            for _ in 0..500 {
                let mut m = seed.clone();
                let i = next() as usize % m.len();
                m[i] = next() as u8;
                fuzzing::check(&m);
            }
        }
    }

    #[test]
    fn ls_dates_follow_the_civil_calendar() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(ls_date(t), "Nov 14 22:13");
        assert_eq!(ls_date(UNIX_EPOCH), "Jan  1 00:00");
    }
}
