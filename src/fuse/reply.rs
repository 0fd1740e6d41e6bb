//! Answers as the kernel reads them from `/dev/fuse`: an `Answer` value per
//! request, encoded field by field behind the out header, and the entry
//! buffers of READDIR and READDIRPLUS.

use std::time::Duration;

use super::abi;

/// A file's attributes as the kernel is told them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    /// `st_ino` as shown (not the node id).
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// Type and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// The kernel's 32-bit `new_encode_dev` form.
    pub rdev: u32,
    pub blksize: u32,
}

/// A name's node and attributes, and how long the kernel may keep each.
#[derive(Clone, Copy, Debug, Default)]
pub struct EntryOut {
    /// The node id (0: a negative entry, the name does not exist).
    pub node: u64,
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
    pub attr: Attr,
}

/// An open file: its handle and how the kernel does its I/O.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOut {
    pub fh: u64,
    /// `FOPEN_*`.
    pub flags: u32,
    /// The registered backing file, with FOPEN_PASSTHROUGH.
    pub backing_id: i32,
}

/// The INIT answer.
#[derive(Clone, Copy, Debug, Default)]
pub struct InitOut {
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub max_stack_depth: u32,
}

/// STATFS's answer.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatfsOut {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// What a request is answered with.
#[derive(Debug)]
pub enum Answer {
    /// No answer at all: FORGET and BATCH_FORGET have none.
    Nothing,
    /// A positive errno.
    Error(i32),
    Empty,
    Entry(EntryOut),
    Attr {
        ttl: Duration,
        attr: Attr,
    },
    Open(OpenOut),
    Create(EntryOut, OpenOut),
    Written(u32),
    /// READ, READLINK, GETXATTR and LISTXATTR data, directory buffers.
    Data(Vec<u8>),
    /// GETXATTR / LISTXATTR asked with size 0: the size needed.
    XattrSize(u32),
    Statfs(StatfsOut),
    Lseek(i64),
    Init(InitOut),
}

/// Little-endian fields appended to a buffer.
struct Put<'a>(&'a mut Vec<u8>);

impl Put<'_> {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn zeroes(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }

    fn attr(&mut self, a: &Attr) -> &mut Self {
        self.u64(a.ino).u64(a.size).u64(a.blocks);
        self.u64(a.atime.0 as u64)
            .u64(a.mtime.0 as u64)
            .u64(a.ctime.0 as u64);
        self.u32(a.atime.1).u32(a.mtime.1).u32(a.ctime.1);
        self.u32(a.mode).u32(a.nlink).u32(a.uid).u32(a.gid);
        self.u32(a.rdev).u32(a.blksize).u32(0)
    }

    fn entry(&mut self, e: &EntryOut) -> &mut Self {
        self.u64(e.node).u64(0);
        self.u64(e.entry_ttl.as_secs()).u64(e.attr_ttl.as_secs());
        self.u32(e.entry_ttl.subsec_nanos())
            .u32(e.attr_ttl.subsec_nanos());
        self.attr(&e.attr)
    }

    fn open(&mut self, o: &OpenOut) -> &mut Self {
        self.u64(o.fh).u32(o.flags).u32(o.backing_id as u32)
    }
}

/// Writes the out header and fixed part of `answer` to request `unique`
/// into `head` (cleared first); returns the variable part that follows it
/// (READ data and the like), or None when the request gets no answer.
pub fn encode<'a>(unique: u64, answer: &'a Answer, head: &mut Vec<u8>) -> Option<&'a [u8]> {
    head.clear();
    head.resize(abi::OUT_HEADER, 0);
    let mut p = Put(head);
    let mut error = 0i32;
    let mut tail: &[u8] = &[];
    match answer {
        Answer::Nothing => return None,
        Answer::Error(e) => error = -e,
        Answer::Empty => {}
        Answer::Entry(e) => {
            p.entry(e);
        }
        Answer::Attr { ttl, attr } => {
            p.u64(ttl.as_secs())
                .u32(ttl.subsec_nanos())
                .u32(0)
                .attr(attr);
        }
        Answer::Open(o) => {
            p.open(o);
        }
        Answer::Create(e, o) => {
            p.entry(e).open(o);
        }
        Answer::Written(n) => {
            p.u32(*n).u32(0);
        }
        Answer::Data(d) => tail = d,
        Answer::XattrSize(n) => {
            p.u32(*n).u32(0);
        }
        Answer::Statfs(s) => {
            p.u64(s.blocks)
                .u64(s.bfree)
                .u64(s.bavail)
                .u64(s.files)
                .u64(s.ffree);
            p.u32(s.bsize)
                .u32(s.namelen)
                .u32(s.frsize)
                .u32(0)
                .zeroes(24);
        }
        Answer::Lseek(off) => {
            p.u64(*off as u64);
        }
        Answer::Init(i) => {
            p.u32(abi::MAJOR).u32(i.minor).u32(i.max_readahead);
            p.u32(i.flags as u32)
                .u16(i.max_background)
                .u16(i.congestion_threshold);
            p.u32(i.max_write).u32(i.time_gran).u16(i.max_pages).u16(0);
            p.u32((i.flags >> 32) as u32).u32(i.max_stack_depth);
            p.u16(0).zeroes(22); // request_timeout, unused
        }
    }
    let len = (head.len() + tail.len()) as u32;
    head[0..4].copy_from_slice(&len.to_le_bytes());
    head[4..8].copy_from_slice(&error.to_le_bytes());
    head[8..16].copy_from_slice(&unique.to_le_bytes());
    Some(tail)
}

/// A notification (`unique` 0, the code in the error field) of fixed part
/// `fields`, followed by `name` and its NUL when given.
pub fn notification(code: i32, fields: &[u64], name: Option<&[u8]>) -> Vec<u8> {
    let mut v = vec![0u8; abi::OUT_HEADER];
    for f in fields {
        v.extend_from_slice(&f.to_le_bytes());
    }
    if let Some(n) = name {
        v.extend_from_slice(n);
        v.push(0);
    }
    let len = v.len() as u32;
    v[0..4].copy_from_slice(&len.to_le_bytes());
    v[4..8].copy_from_slice(&code.to_le_bytes());
    v
}

/// The entries of a READDIR or READDIRPLUS answer, up to the size the
/// kernel asked for.
pub struct DirBuf {
    buf: Vec<u8>,
    max: usize,
}

/// `DT_*` of a mode's type bits.
fn dtype(mode: u32) -> u32 {
    (mode & libc::S_IFMT) >> 12
}

impl DirBuf {
    pub fn new(max: u32) -> DirBuf {
        DirBuf {
            buf: Vec::with_capacity((max as usize).min(1 << 16)),
            max: max as usize,
        }
    }

    /// Adds an entry (`next`: the offset of the one after it); false when
    /// it does not fit, nothing added.
    pub fn add(&mut self, ino: u64, next: u64, mode: u32, name: &[u8]) -> bool {
        let size = dirent_size(abi::DIRENT + name.len());
        if self.buf.len() + size > self.max {
            return false;
        }
        self.dirent(ino, next, mode, name, size);
        true
    }

    /// Adds an entry with the lookup answer `e` of its name (READDIRPLUS);
    /// false when it does not fit.
    pub fn add_plus(&mut self, e: &EntryOut, next: u64, name: &[u8]) -> bool {
        let size = dirent_size(abi::ENTRY_OUT + abi::DIRENT + name.len());
        if self.buf.len() + size > self.max {
            return false;
        }
        Put(&mut self.buf).entry(e);
        self.dirent(e.attr.ino, next, e.attr.mode, name, size - abi::ENTRY_OUT);
        true
    }

    fn dirent(&mut self, ino: u64, next: u64, mode: u32, name: &[u8], size: usize) {
        let start = self.buf.len();
        Put(&mut self.buf)
            .u64(ino)
            .u64(next)
            .u32(name.len() as u32)
            .u32(dtype(mode));
        self.buf.extend_from_slice(name);
        self.buf.resize(start + size, 0);
    }

    pub fn into_answer(self) -> Answer {
        Answer::Data(self.buf)
    }
}

/// A dirent's size, padded to 8 bytes.
fn dirent_size(unpadded: usize) -> usize {
    unpadded.div_ceil(8) * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_have_the_kernels_sizes() {
        let mut head = Vec::new();
        let sizes = [
            (Answer::Entry(EntryOut::default()), abi::ENTRY_OUT),
            (
                Answer::Attr {
                    ttl: Duration::ZERO,
                    attr: Attr::default(),
                },
                abi::ATTR_OUT,
            ),
            (Answer::Open(OpenOut::default()), abi::OPEN_OUT),
            (
                Answer::Create(EntryOut::default(), OpenOut::default()),
                abi::ENTRY_OUT + abi::OPEN_OUT,
            ),
            (Answer::Init(InitOut::default()), abi::INIT_OUT),
            (Answer::Statfs(StatfsOut::default()), abi::KSTATFS),
            (Answer::Written(1), 8),
            (Answer::Lseek(1), 8),
            (Answer::Empty, 0),
        ];
        for (a, size) in sizes {
            encode(9, &a, &mut head).unwrap();
            assert_eq!(head.len(), abi::OUT_HEADER + size, "{a:?}");
            assert_eq!(
                u32::from_le_bytes(head[0..4].try_into().unwrap()) as usize,
                head.len()
            );
        }
        assert!(encode(9, &Answer::Nothing, &mut head).is_none());
    }

    #[test]
    fn errors_are_negative_and_data_follows() {
        let mut head = Vec::new();
        encode(5, &Answer::Error(libc::ENOENT), &mut head).unwrap();
        assert_eq!(
            i32::from_le_bytes(head[4..8].try_into().unwrap()),
            -libc::ENOENT
        );
        assert_eq!(u64::from_le_bytes(head[8..16].try_into().unwrap()), 5);
        let data = Answer::Data(vec![1, 2, 3]);
        let tail = encode(6, &data, &mut head).unwrap();
        assert_eq!(tail, [1, 2, 3]);
        assert_eq!(u32::from_le_bytes(head[0..4].try_into().unwrap()), 19);
    }

    #[test]
    fn directory_entries_are_padded_and_bounded() {
        let mut d = DirBuf::new(64);
        assert!(d.add(7, 1, libc::S_IFDIR, b"abc"));
        assert!(d.add(8, 2, libc::S_IFREG, b"defgh"));
        assert!(!d.add(9, 3, libc::S_IFREG, b"toolongforthisbuffer"));
        let Answer::Data(v) = d.into_answer() else {
            panic!()
        };
        assert_eq!(v.len(), 64);
        assert_eq!(
            u32::from_le_bytes(v[20..24].try_into().unwrap()),
            libc::DT_DIR as u32
        );
        let mut p = DirBuf::new(4096);
        assert!(p.add_plus(&EntryOut::default(), 1, b"x"));
        let Answer::Data(v) = p.into_answer() else {
            panic!()
        };
        assert_eq!(v.len(), dirent_size(abi::ENTRY_OUT + abi::DIRENT + 1));
    }
}
