//! `commit`: write what the layers above a base image hold into it, then
//! (when the base is the top image's own backing file) empty the top image
//! so that it reads through to the base again, as `qemu-img commit` does.
//!
//! Only the ranges block status says the layers above the base allocate are
//! read and written; ranges they hold as zeroes become zeroes in the base.
//! Crash order: the base is written and flushed before the top is emptied,
//! so an interrupted commit leaves the top still reading as before.

use super::convert::CHUNK;
use super::{cancelled, Progress};
use crate::error::{invalid, try_zeroed, Result};
use crate::image::Image;

/// Commit `top` (open read-write, reading through its chain) into layer
/// `depth` of its chain (1 is its backing file), opened a second time,
/// read-write, as `base`. A base smaller than the top is grown first.
/// With `empty`, and only when `depth` is 1 (a deeper base leaves the
/// images between stale, so the top must keep its data, as qemu-img's `-b`
/// implies `-d`), the top is emptied afterwards. Returns whether it was.
pub fn commit(top: &Image, depth: u32, base: &Image, empty: bool, progress: &mut dyn Progress) -> Result<bool> {
    let mut chain_len = 0u32;
    let mut layer = top.backing_image();
    while let Some(l) = layer {
        chain_len += 1;
        layer = l.backing_image();
    }
    if depth == 0 || depth > chain_len {
        return Err(invalid(format!(
            "the image has {chain_len} backing layer(s); cannot commit into layer {depth}"
        )));
    }
    let size = top.virtual_size();
    if base.virtual_size() < size {
        base.truncate(size)?;
    }
    let mut buf = try_zeroed(CHUNK as usize, "a commit buffer")?;
    let mut pos = 0u64;
    while pos < size {
        if !progress.report(pos, size) {
            return Err(cancelled());
        }
        let st = top.block_status(pos, (size - pos).min(CHUNK))?;
        if st.present && st.depth < depth {
            if st.zero {
                base.write_zeroes(pos, st.len)?;
            } else {
                let b = &mut buf[..st.len as usize];
                top.read_at(b, pos)?;
                base.write_at(b, pos)?;
            }
        }
        pos += st.len;
    }
    base.flush()?;
    let emptied = empty && depth == 1;
    if emptied {
        top.make_empty()?;
        top.flush()?;
    }
    progress.report(size, size);
    Ok(emptied)
}
