//! Raw deflate (RFC 1951) of a compressed cluster, inflated into a buffer of
//! the cluster's size: qcow2 (compression type zlib) and qcow version 1.
//!
//! The rule is QEMU's (`qcow2_zlib_decompress`): success when the output
//! buffer is full, whatever follows in the input (stored sizes are rounded
//! up to sectors; a stream may even go on past the cluster); failure when
//! the stream ends or the input runs out before it is full.
//!
//! libdeflate decodes whole buffers about 1.5x faster than zlib-rs, but it
//! only accepts a stream that ends within the output; anything else (a
//! stream longer than the cluster, a truncated or bad one) is decided by
//! the streaming inflater, so both paths give QEMU's answer.

use crate::error::{corrupt, Result};
use std::cell::RefCell;

thread_local! {
    /// One libdeflate decompressor per thread (about 10 KiB of tables).
    static FAST: RefCell<Option<libdeflater::Decompressor>> = const { RefCell::new(None) };
}

/// Inflate `input` into exactly `out.len()` bytes.
pub fn raw_exact(input: &[u8], out: &mut [u8]) -> Result<()> {
    let fast = FAST.with(|f| {
        let mut f = f.borrow_mut();
        let d = f.get_or_insert_with(libdeflater::Decompressor::new);
        d.deflate_decompress(input, out)
    });
    match fast {
        Ok(n) if n == out.len() => Ok(()),
        _ => streaming(input, out),
    }
}

/// The streaming inflater, stopping as soon as `out` is full.
fn streaming(input: &[u8], out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    loop {
        let (i, o) = (d.total_in() as usize, d.total_out() as usize);
        let st = d
            .decompress(&input[i..], &mut out[o..], FlushDecompress::Finish)
            .map_err(|e| corrupt(format!("bad deflate data in a compressed cluster: {e}")))?;
        let done = d.total_out() as usize;
        if done == out.len() {
            return Ok(());
        }
        let progressed = d.total_in() as usize != i || done != o;
        if st == Status::StreamEnd || !progressed {
            return Err(corrupt(format!(
                "compressed cluster inflates to {done} bytes, not {}",
                out.len()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn sample(n: usize) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x1f)
            .collect()
    }

    #[test]
    fn exact_stream_with_trailing_bytes() {
        let data = sample(65536);
        let mut c = deflate(&data);
        c.extend_from_slice(&[0xaa; 511]);
        let mut out = vec![0u8; 65536];
        raw_exact(&c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn stream_longer_than_the_cluster_fills_it() {
        // QEMU takes the first cluster's worth; libdeflate alone would refuse.
        let data = sample(70000);
        let c = deflate(&data);
        let mut out = vec![0u8; 65536];
        raw_exact(&c, &mut out).unwrap();
        assert_eq!(out[..], data[..65536]);
    }

    #[test]
    fn short_truncated_or_bad_streams_are_corrupt() {
        let data = sample(4096);
        let c = deflate(&data);
        let mut big = vec![0u8; 8192];
        assert_eq!(
            raw_exact(&c, &mut big).unwrap_err().kind(),
            crate::error::ErrorKind::CorruptImage
        );
        let mut out = vec![0u8; 4096];
        assert!(raw_exact(&c[..c.len() / 2], &mut out).is_err());
        assert!(raw_exact(&[0xff; 64], &mut out).is_err());
        assert!(raw_exact(&[], &mut out).is_err());
    }
}
