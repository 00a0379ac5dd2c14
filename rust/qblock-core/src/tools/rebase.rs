//! `rebase`: put an image on another backing file (or none) so that it
//! reads the same afterwards, as `qemu-img rebase` does in its safe mode.
//!
//! Only ranges the image does not allocate itself can change: for each,
//! the old chain's bytes are compared with the new base's, and where they
//! differ the old bytes are written into the image. Ranges that read as
//! zeroes on both sides (by block status) are not read at all. The new
//! backing file is recorded last, so an interrupted rebase leaves the image
//! on its old backing file, reading as before.

use super::convert::CHUNK;
use super::{cancelled, zeroes, Progress};
use crate::driver::BackingRef;
use crate::error::{try_zeroed, Result};
use crate::image::Image;

/// Granularity of the comparison: a differing unit is written whole.
const UNIT: u64 = 64 << 10;

/// Rebase `image` (open read-write, reading through its old chain) onto
/// `new_base` (open read-only; `None`: no backing file, the old chain's
/// content is copied in), recording `new_ref` as its backing file.
pub fn rebase(
    image: &Image,
    new_base: Option<&Image>,
    new_ref: Option<&BackingRef>,
    progress: &mut dyn Progress,
) -> Result<()> {
    let size = image.virtual_size();
    let mut old = try_zeroed(CHUNK as usize, "a rebase buffer")?;
    let mut new = try_zeroed(CHUNK as usize, "a rebase buffer")?;
    let mut pos = 0u64;
    while pos < size {
        if !progress.report(pos, size) {
            return Err(cancelled());
        }
        let st = image.block_status(pos, (size - pos).min(CHUNK))?;
        let (at, len) = (pos, st.len);
        pos += len;
        if st.present && st.depth == 0 {
            continue; // the image's own data: the backing file does not show
        }
        let old_zero = !st.present || st.zero;
        let new_zero = match new_base {
            Some(b) => reads_zero(b, at, len)?,
            None => true,
        };
        if old_zero && new_zero {
            continue;
        }
        let o = &mut old[..len as usize];
        if old_zero {
            o.fill(0);
        } else {
            image.read_at(o, at)?;
        }
        let n = &mut new[..len as usize];
        read_or_zero(new_base, n, at)?;
        // Write the differing units, each clipped to this run.
        let mut u = at;
        while u < at + len {
            let end = ((u / UNIT + 1) * UNIT).min(at + len);
            let (a, b) = ((u - at) as usize, (end - at) as usize);
            if o[a..b] != n[a..b] {
                if old_zero || zeroes::is_zero(&o[a..b]) {
                    image.write_zeroes(u, end - u)?;
                } else {
                    image.write_at(&o[a..b], u)?;
                }
            }
            u = end;
        }
    }
    image.set_backing(new_ref)?;
    image.flush()?;
    progress.report(size, size);
    Ok(())
}

/// Whether `[at, at+len)` of `img` reads as zeroes by block status alone
/// (past its end it does).
fn reads_zero(img: &Image, at: u64, len: u64) -> Result<bool> {
    let size = img.virtual_size();
    let mut p = at;
    let end = (at + len).min(size);
    while p < end {
        let st = img.block_status(p, end - p)?;
        if st.present && !st.zero {
            return Ok(false);
        }
        p += st.len;
    }
    Ok(true)
}

/// `buf` from `img` at `at`, zeroes where there is no image or past its end.
fn read_or_zero(img: Option<&Image>, buf: &mut [u8], at: u64) -> Result<()> {
    buf.fill(0);
    if let Some(img) = img {
        let size = img.virtual_size();
        if at < size {
            let n = (size - at).min(buf.len() as u64) as usize;
            img.read_at(&mut buf[..n], at)?;
        }
    }
    Ok(())
}
