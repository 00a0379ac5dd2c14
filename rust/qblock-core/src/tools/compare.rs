//! `compare`: whether two images show the same guest content, as
//! `qemu-img compare` decides it.
//!
//! Ranges both images report as zero are not read. A mismatch is reported
//! at the start of the first 512-byte sector that differs, as qemu-img does.
//! Without `strict`, an image longer than the other must read as zeroes
//! past the other's end; with it, sizes and allocation (`present` in block
//! status) must match too.

use super::{cancelled, zeroes, Progress};
use crate::error::{try_zeroed, Result};
use crate::image::Image;

const SECTOR: u64 = 512;
const CHUNK: u64 = 1 << 20;

/// Why two images differ, or that they do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Identical,
    /// Content differs from this offset (the start of its 512-byte sector).
    ContentMismatch(u64),
    /// Strict mode: the virtual sizes differ.
    SizeMismatch,
    /// Strict mode: one image has the range allocated, the other not.
    AllocationMismatch(u64),
}

pub fn compare(a: &Image, b: &Image, strict: bool, progress: &mut dyn Progress) -> Result<Verdict> {
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    if strict && sa != sb {
        return Ok(Verdict::SizeMismatch);
    }
    let common = sa.min(sb);
    let total = sa.max(sb);
    let mut ba = try_zeroed(CHUNK as usize, "compare buffer")?;
    let mut bb = try_zeroed(CHUNK as usize, "compare buffer")?;
    let mut pos = 0u64;
    while pos < common {
        if !progress.report(pos, total) {
            return Err(cancelled());
        }
        // Strict mode compares whole runs, as qemu-img compares its block
        // status flags: allocation, data, zero, and whether the run reaches
        // the end of the image (QEMU's BDRV_BLOCK_EOF).
        let want = if strict {
            common - pos
        } else {
            (common - pos).min(CHUNK)
        };
        let x = a.block_status(pos, want)?;
        let y = b.block_status(pos, want)?;
        if strict {
            let flags = |s: &crate::image::BlockStatus| (s.present, s.data, s.zero, pos + s.len == common);
            if flags(&x) != flags(&y) {
                return Ok(Verdict::AllocationMismatch(pos));
            }
        }
        let n = x.len.min(y.len).min(CHUNK);
        let (zx, zy) = (x.zero && !x.data, y.zero && !y.data);
        if !(zx && zy) {
            let n = n as usize;
            if zx {
                ba[..n].fill(0);
            } else {
                a.read_at(&mut ba[..n], pos)?;
            }
            if zy {
                bb[..n].fill(0);
            } else {
                b.read_at(&mut bb[..n], pos)?;
            }
            if let Some(at) = first_difference(&ba[..n], &bb[..n]) {
                return Ok(Verdict::ContentMismatch(pos + at / SECTOR * SECTOR));
            }
        }
        pos += n;
    }
    // Past the shorter image's end the longer one must read as zeroes.
    let longer = if sa > sb { a } else { b };
    while pos < total {
        if !progress.report(pos, total) {
            return Err(cancelled());
        }
        let st = longer.block_status(pos, (total - pos).min(CHUNK))?;
        if !st.zero || st.data {
            let n = st.len as usize;
            longer.read_at(&mut ba[..n], pos)?;
            if !zeroes::is_zero(&ba[..n]) {
                let at = ba[..n].iter().position(|&v| v != 0).unwrap_or(0) as u64;
                return Ok(Verdict::ContentMismatch(pos + at / SECTOR * SECTOR));
            }
        }
        pos += st.len;
    }
    progress.report(total, total);
    Ok(Verdict::Identical)
}

/// Offset of the first differing byte. Compares 4 KiB at a time first, so
/// equal data (the usual case) runs at memcmp speed.
fn first_difference(x: &[u8], y: &[u8]) -> Option<u64> {
    let mut off = 0usize;
    for (cx, cy) in x.chunks(4096).zip(y.chunks(4096)) {
        if cx != cy {
            let i = cx.iter().zip(cy).position(|(p, q)| p != q).unwrap_or(0);
            return Some((off + i) as u64);
        }
        off += cx.len();
    }
    None
}
