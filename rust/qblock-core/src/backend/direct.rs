//! O_DIRECT I/O for local files (the seed's O_NOCACHE: bypass the host page
//! cache). The kernel then wants offsets, lengths and memory aligned to the
//! device's logical block; drivers read and write any byte range, so every
//! request goes through an aligned bounce buffer unless it is aligned
//! already, and a write that covers part of a block reads the block first.
//!
//! Alignment: 4096 bytes, which satisfies 512-byte and 4 KiB logical blocks
//! alike (QEMU probes; 4096 is what its probe ends with on such devices).
//!
//! Concurrency: a partial-block write is a read-modify-write, so writes
//! take striped locks over the blocks they touch (two threads writing
//! different bytes of one block must not undo each other). A write that
//! reaches past the end of the file writes whole blocks and then cuts the
//! file back to the exact end; such writes, and `set_len`, serialize on one
//! more lock, so a cut never removes another write's bytes.

use parking_lot::{Mutex, MutexGuard};
use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Offsets, lengths and buffers are aligned to this.
pub const ALIGN: u64 = 4096;
/// Largest bounce buffer one request uses; longer requests go in pieces.
const CHUNK: u64 = 1 << 20;
/// Lock stripes over block numbers (a power of two).
const STRIPES: usize = 64;

/// Zeroed memory aligned to `ALIGN`.
struct Bounce {
    ptr: *mut u8,
    layout: Layout,
}

impl Bounce {
    fn new(len: usize) -> io::Result<Bounce> {
        let layout = Layout::from_size_align(len.max(1), ALIGN as usize)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(Bounce { ptr, layout })
    }

    fn as_mut(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` points at `layout.size()` initialised (zeroed) bytes
        // that only this Bounce owns; `len` never exceeds that size.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.layout.size())) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

fn aligned(buf: &[u8], offset: u64) -> bool {
    (buf.as_ptr() as u64).is_multiple_of(ALIGN)
        && offset.is_multiple_of(ALIGN)
        && (buf.len() as u64).is_multiple_of(ALIGN)
}

/// Read `buf.len()` bytes (aligned request); whatever lies past the end of
/// the file reads as zeroes. With O_DIRECT a short read means the end.
fn pread_aligned(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if !(done as u64).is_multiple_of(ALIGN) {
                    break; // the file ends inside this block
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// The block-level state of one O_DIRECT file.
pub struct Direct {
    stripes: Vec<Mutex<()>>,
    grow: Mutex<()>,
    /// The file, named in the one slow-path event it may log.
    path: PathBuf,
    bounced: AtomicBool,
}

impl Direct {
    pub fn new(path: &Path) -> Direct {
        Direct {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            grow: Mutex::new(()),
            path: path.to_path_buf(),
            bounced: AtomicBool::new(false),
        }
    }

    /// The first unaligned request of this file says so (debug level).
    fn note_bounce(&self) {
        // A plain load first: after the first request no thread writes the flag.
        if !self.bounced.load(Ordering::Relaxed) && !self.bounced.swap(true, Ordering::Relaxed) {
            crate::events::slow_path(
                "O_NOCACHE with unaligned requests: they go through aligned bounce buffers \
                 (partial blocks read first when written)",
                &self.path,
            );
        }
    }
}

/// A bounce buffer for a request of `len` bytes: its pieces (at most
/// `CHUNK`) widened to whole blocks at both ends.
fn bounce_for(len: usize) -> io::Result<Bounce> {
    Bounce::new(len.min(CHUNK as usize) + 2 * ALIGN as usize)
}

impl Direct {
    /// Fill `buf` from `offset`; past the end of the file, zeroes.
    pub fn read_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if aligned(buf, offset) {
            return pread_aligned(file, buf, offset);
        }
        self.note_bounce();
        let mut bounce = bounce_for(buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = (buf.len() - done).min(CHUNK as usize);
            let a0 = pos & !(ALIGN - 1);
            let a1 = (pos + n as u64).next_multiple_of(ALIGN);
            let b = bounce.as_mut((a1 - a0) as usize);
            pread_aligned(file, b, a0)?;
            let at = (pos - a0) as usize;
            buf[done..done + n].copy_from_slice(&b[at..at + n]);
            done += n;
        }
        Ok(())
    }

    /// The stripe locks over blocks `[first, last]`, taken in stripe order
    /// (every writer takes them in that order, so none can deadlock).
    fn lock_blocks(&self, first: u64, last: u64) -> Vec<MutexGuard<'_, ()>> {
        let n = (last - first + 1).min(STRIPES as u64);
        let mut idx: Vec<usize> = (0..n).map(|k| ((first + k) as usize) % STRIPES).collect();
        idx.sort_unstable();
        idx.into_iter().map(|i| self.stripes[i].lock()).collect()
    }

    /// Write all of `buf` at `offset`, growing the file to exactly the end
    /// of the write when it reaches past the end.
    pub fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bounce: Option<Bounce> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = (buf.len() - done).min(CHUNK as usize);
            let piece = &buf[done..done + n];
            let end = pos + n as u64;
            let a0 = pos & !(ALIGN - 1);
            let a1 = end.next_multiple_of(ALIGN);
            let _blocks = self.lock_blocks(a0 / ALIGN, (a1 - 1) / ALIGN);
            let mut len = file.metadata()?.len();
            let _grow = if a1 > len {
                let g = self.grow.lock();
                // Another growing write may have finished meanwhile.
                len = file.metadata()?.len();
                Some(g)
            } else {
                None
            };
            if aligned(piece, pos) {
                file.write_all_at(piece, pos)?;
            } else {
                let bb = match &mut bounce {
                    Some(b) => b,
                    slot @ None => {
                        self.note_bounce();
                        slot.insert(bounce_for(buf.len())?)
                    }
                };
                let b = bb.as_mut((a1 - a0) as usize);
                // Only the partial first and last blocks need their old bytes.
                if !pos.is_multiple_of(ALIGN) {
                    pread_aligned(file, &mut b[..ALIGN as usize], a0)?;
                }
                if !end.is_multiple_of(ALIGN) && (a1 - ALIGN > a0 || pos.is_multiple_of(ALIGN)) {
                    let at = (a1 - ALIGN - a0) as usize;
                    pread_aligned(file, &mut b[at..], a1 - ALIGN)?;
                }
                let at = (pos - a0) as usize;
                b[at..at + n].copy_from_slice(piece);
                file.write_all_at(b, a0)?;
                if a1 > len && end < a1 {
                    // Whole blocks went out: cut the padding past our end.
                    file.set_len(len.max(end))?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Resize, serialized with writes that grow the file.
    pub fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        let _grow = self.grow.lock();
        file.set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn bounce_buffers_are_aligned_and_zeroed() {
        let mut b = Bounce::new(10_000).unwrap();
        let s = b.as_mut(10_000);
        assert_eq!(s.as_ptr() as u64 % ALIGN, 0);
        assert!(s.iter().all(|&x| x == 0));
    }

    /// A new empty file opened with O_DIRECT, in the temporary folder or,
    /// where that file system refuses O_DIRECT (tmpfs before Linux 6.6), under
    /// `target/`.
    fn direct_file() -> (tempfile::TempDir, File) {
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
        for base in [std::env::temp_dir(), target] {
            let Ok(dir) = tempfile::tempdir_in(&base) else { continue };
            let p = dir.path().join("d.bin");
            std::fs::write(&p, []).unwrap();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&p);
            if let Ok(f) = f {
                return (dir, f);
            }
        }
        panic!("no folder here takes O_DIRECT files");
    }

    /// Unaligned writes and reads of every shape against a model: the file
    /// holds the model's bytes and ends exactly where the model ends.
    #[test]
    fn unaligned_io_matches_a_model() {
        let (_dir, f) = direct_file();
        let d = Direct::new(Path::new("test"));
        let mut model: Vec<u8> = Vec::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        for i in 0..300u64 {
            let off = rnd(3 << 20);
            let len = match i % 4 {
                0 => 1 + rnd(16),
                1 => 4096,
                2 => 1 + rnd(300_000),
                _ => 1 + rnd(2 << 20),
            } as usize;
            let off = if i % 5 == 0 { off & !(ALIGN - 1) } else { off };
            let data: Vec<u8> = (0..len).map(|k| (i as usize * 31 + k) as u8).collect();
            d.write_at(&f, &data, off).unwrap();
            let end = off as usize + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
            assert_eq!(f.metadata().unwrap().len(), model.len() as u64, "write {i}");
            let (ro, rl) = (rnd(model.len() as u64 + 10_000), 1 + rnd(400_000) as usize);
            let mut got = vec![0xffu8; rl];
            d.read_at(&f, &mut got, ro).unwrap();
            for (k, &b) in got.iter().enumerate() {
                let want = model.get(ro as usize + k).copied().unwrap_or(0);
                assert_eq!(b, want, "read {i} at {ro}+{k}");
            }
        }
        d.set_len(&f, 5000).unwrap();
        let mut got = vec![0u8; 8192];
        d.read_at(&f, &mut got, 0).unwrap();
        assert_eq!(&got[..5000], &model[..5000]);
        assert!(got[5000..].iter().all(|&b| b == 0));
    }

    /// Threads writing different bytes of the same blocks, and growing the
    /// file from different blocks, lose nothing.
    #[test]
    fn concurrent_partial_block_writes_keep_every_byte() {
        let (_dir, f) = direct_file();
        let d = Direct::new(Path::new("test"));
        let threads = 4u64;
        std::thread::scope(|s| {
            for t in 0..threads {
                let (f, d) = (&f, &d);
                s.spawn(move || {
                    for k in 0..2000u64 {
                        // Byte t of each 4-byte group: every block is shared.
                        let off = (k * 4 + t) * 97 % (1 << 20) / 4 * 4 + t;
                        d.write_at(f, &[(t + 1) as u8], off).unwrap();
                    }
                });
            }
        });
        let mut got = vec![0u8; 1 << 20];
        d.read_at(&f, &mut got, 0).unwrap();
        for t in 0..threads {
            for k in 0..2000u64 {
                let off = (k * 4 + t) * 97 % (1 << 20) / 4 * 4 + t;
                assert_eq!(got[off as usize], (t + 1) as u8, "thread {t} write {k}");
            }
        }
        let max = (0..threads)
            .flat_map(|t| (0..2000u64).map(move |k| (k * 4 + t) * 97 % (1 << 20) / 4 * 4 + t))
            .max()
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), max + 1);
    }
}
