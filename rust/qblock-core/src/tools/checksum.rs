//! `checksum`: a hash of the guest-visible disk, the same for the same
//! content in any format, that skips what block status says is zero.
//!
//! The algorithm (version 1), fixed so that results can be compared across
//! releases and machines:
//!
//! - The disk is cut into blocks of 64 KiB (the last one may be shorter).
//!   Each block's digest is BLAKE3 of its bytes.
//! - Every 1024 consecutive blocks (64 MiB) form a segment; a segment's
//!   digest is BLAKE3 of its blocks' digests, concatenated in order.
//! - The checksum is BLAKE3 of the ASCII tag `qblock-checksum-v1`, the
//!   virtual size as 8 little-endian bytes, and the segment digests in
//!   order; printed as 64 hex digits.
//!
//! A block that block status reports as reading zero is never read: its
//! digest is that of zero bytes, computed once. Segments are hashed in
//! parallel, so the result does not depend on the thread count.

use super::{cancelled, caught, worker_count, Progress};
use crate::error::{try_zeroed, Result};
use crate::image::Image;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

pub const BLOCK: u64 = 64 << 10;
pub const SEGMENT_BLOCKS: u64 = 1024;
const SEGMENT: u64 = BLOCK * SEGMENT_BLOCKS;
const TAG: &[u8] = b"qblock-checksum-v1";

/// The checksum of `image`'s whole virtual disk, as 64 hex digits.
pub fn checksum(image: &Image, threads: usize, progress: &mut dyn Progress) -> Result<String> {
    let size = image.virtual_size();
    let segments = size.div_ceil(SEGMENT) as usize;
    let digests: Vec<OnceLock<[u8; 32]>> = (0..segments).map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<crate::Error>> = Mutex::new(None);
    // The first failure (or the cancellation) is the answer; it stops every worker.
    let fail = |e: crate::Error| {
        first_error.lock().unwrap().get_or_insert(e);
        stop.store(true, Ordering::Relaxed);
    };
    let zero_block = *blake3::hash(&vec![0u8; BLOCK as usize]).as_bytes();
    std::thread::scope(|s| {
        for _ in 0..worker_count(threads).min(segments.max(1)) {
            s.spawn(|| {
                let mut buf = match try_zeroed(BLOCK as usize * 16, "checksum buffer") {
                    Ok(b) => b,
                    Err(e) => return fail(e),
                };
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= segments {
                        break;
                    }
                    match caught(|| segment_digest(image, i as u64, size, &zero_block, &mut buf)) {
                        Ok(d) => {
                            let _ = digests[i].set(d);
                            let end = ((i as u64 + 1) * SEGMENT).min(size);
                            done.fetch_add(end - i as u64 * SEGMENT, Ordering::Relaxed);
                        }
                        Err(e) => fail(e),
                    }
                }
            });
        }
        // The caller's thread reports progress while the workers hash.
        loop {
            let d = done.load(Ordering::Relaxed);
            if !progress.report(d, size) {
                fail(cancelled());
            }
            if d >= size || stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    let mut h = blake3::Hasher::new();
    h.update(TAG);
    h.update(&size.to_le_bytes());
    for d in digests {
        let d = d
            .into_inner()
            .ok_or_else(|| crate::Error::Internal("a checksum segment was left unhashed".into()))?;
        h.update(&d);
    }
    Ok(h.finalize().to_hex().to_string())
}

fn segment_digest(image: &Image, seg: u64, size: u64, zero_block: &[u8; 32], buf: &mut [u8]) -> Result<[u8; 32]> {
    let start = seg * SEGMENT;
    let end = (start + SEGMENT).min(size);
    let mut h = blake3::Hasher::new();
    let mut pos = start; // always on a block boundary
    while pos < end {
        let st = image.block_status(pos, end - pos)?;
        let run_end = pos + st.len;
        if st.zero && !st.data {
            // Whole blocks inside the zero run take the precomputed digest
            // (the disk's short last block, if the run reaches it, its own).
            let whole = if run_end == end {
                end
            } else {
                pos + (run_end - pos) / BLOCK * BLOCK
            };
            while pos < whole {
                let n = (whole - pos).min(BLOCK);
                if n == BLOCK {
                    h.update(zero_block);
                } else {
                    h.update(blake3::hash(&vec![0u8; n as usize]).as_bytes());
                }
                pos += n;
            }
            if pos >= run_end {
                continue;
            }
        }
        // Read whole blocks from `pos` up to the end of the block holding
        // the run's end; zero blocks among them hash to the same digest.
        let upto = run_end.next_multiple_of(BLOCK).min(end);
        let n = (upto - pos).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        image.read_at(chunk, pos)?;
        for b in chunk.chunks(BLOCK as usize) {
            h.update(blake3::hash(b).as_bytes());
        }
        pos += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}
