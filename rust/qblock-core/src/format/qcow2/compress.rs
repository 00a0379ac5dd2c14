//! Compressed clusters (docs/interop/qcow2.txt: "Compressed Clusters
//! Descriptor", "compression type"): zlib means a raw deflate stream
//! (no zlib header), zstd a zstd frame. The stored length is rounded up to
//! whole sectors, so trailing bytes after the stream are ignored; the output
//! must fill exactly one cluster. Encoding follows QEMU's settings, so
//! that QEMU (inflating with a 4 KiB window) reads what we write.

use super::types::{COMPRESSION_ZLIB, COMPRESSION_ZSTD};
use crate::error::{corrupt, unsupported, Result};
use crate::format::deflate::{deflate, whole_unit, Container};

pub fn decompress(kind: u8, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        COMPRESSION_ZLIB => crate::format::inflate::raw_exact(input, out),
        COMPRESSION_ZSTD => unzstd(input, out),
        t => Err(unsupported(format!("compression type {t}"))),
    }
}

/// zstd level: QEMU's (the library default).
const ZSTD_LEVEL: i32 = 3;

/// One cluster (`data`, zero-padded to `cluster` bytes when shorter)
/// encoded as `kind`, or None when the encoding is not smaller than a
/// cluster less one byte (QEMU's rule; such a cluster is stored plainly).
/// zlib streams use a 4 KiB window: QEMU inflates with windowBits -12.
pub fn compress_cluster(kind: u8, data: &[u8], cluster: usize) -> Result<Option<Vec<u8>>> {
    let input = &whole_unit(data, cluster)?[..];
    let limit = cluster - 1;
    match kind {
        COMPRESSION_ZLIB => deflate(input, limit, Container::Raw4K),
        COMPRESSION_ZSTD => {
            let mut out = vec![0u8; limit];
            match zstd::bulk::compress_to_buffer(input, &mut out, ZSTD_LEVEL) {
                Ok(n) => {
                    out.truncate(n);
                    out.shrink_to_fit();
                    Ok(Some(out))
                }
                Err(_) => Ok(None), // too big for the limit
            }
        }
        t => Err(unsupported(format!("compression type {t}"))),
    }
}

/// zstd's smallest window (ZSTD_WINDOWLOG_ABSOLUTEMIN).
const ZSTD_MIN_WINDOW_LOG: u32 = 10;

/// The largest window the buffered fallback accepts: twice the cluster,
/// rounded up to a power of two (4 MiB for 2 MiB clusters). zstd sizes a
/// frame's window to its input, so frames QEMU writes need at most the
/// cluster; a buffered decoder allocates whatever window the frame
/// declares (up to zstd's default cap of 128 MiB) otherwise.
fn zstd_window_log_max(cluster: usize) -> u32 {
    (cluster.max(1).next_power_of_two().trailing_zeros() + 1).max(ZSTD_MIN_WINDOW_LOG)
}

/// Decode one zstd frame into exactly `out.len()` bytes, as QEMU does
/// (success once the output is full). First straight into `out` (stable
/// output: no window buffer, whatever window the frame declares, within
/// zstd's default cap as QEMU's); a frame going on past the cluster does
/// not fit that mode, so it is decoded again buffered, with the window
/// capped by [`zstd_window_log_max`].
fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    match unzstd_mode(input, out, true) {
        Ok(_) => Ok(()),
        Err(_) => unzstd_mode(input, out, false).map(|_| ()),
    }
}

/// One decoding attempt; returns the context's memory (ZSTD_sizeof_DCtx)
/// for the tests.
fn unzstd_mode(input: &[u8], out: &mut [u8], stable: bool) -> Result<usize> {
    use zstd::zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer};
    let bad = |e: usize| {
        corrupt(format!(
            "bad zstd data in a compressed cluster: {}",
            zstd::zstd_safe::get_error_name(e)
        ))
    };
    let mut d = DCtx::try_create().ok_or_else(|| corrupt("zstd: cannot create a decoder"))?;
    if stable {
        d.set_parameter(DParameter::StableOutBuffer(true)).map_err(bad)?;
    } else {
        d.set_parameter(DParameter::WindowLogMax(zstd_window_log_max(out.len())))
            .map_err(bad)?;
    }
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        let hint = d.decompress_stream(&mut outb, &mut inb).map_err(bad)?;
        if outb.pos() == outb.capacity() {
            return Ok(d.sizeof());
        }
        if hint == 0 || (inb.pos(), outb.pos()) == before {
            return Err(corrupt(format!(
                "compressed cluster decodes to {} bytes, not {}",
                outb.pos(),
                outb.capacity()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn zstd_large_windows_cost_no_window_buffer() {
        use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation, OutBuffer};
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 ^ (i >> 9) as u8).collect();
        // A frame of `data` with the given window and no content size (a
        // buffered decoder allocates the whole window for it).
        let frame = |window_log: u32, input: &[u8]| {
            let mut e = Encoder::new(3).unwrap();
            e.set_parameter(CParameter::WindowLog(window_log)).unwrap();
            e.set_parameter(CParameter::ContentSizeFlag(false)).unwrap();
            let mut c = vec![0u8; 2 * input.len() + 64];
            let mut out = OutBuffer::around(&mut c[..]);
            e.run(&mut InBuffer::around(input), &mut out).unwrap();
            while e.finish(&mut out, true).unwrap() != 0 {}
            let n = out.pos();
            c.truncate(n);
            c
        };
        // A 128 MiB window (zstd's and QEMU's cap): read as QEMU reads it,
        // straight into the cluster; the decoder stays far below the window.
        let big = frame(27, &data);
        let mut out = vec![0u8; data.len()];
        let used = unzstd_mode(&big, &mut out, true).unwrap();
        assert_eq!(out, data);
        assert!(used < 1 << 20, "decoder holds {used} bytes");
        let mut out = vec![0u8; data.len()];
        unzstd(&big, &mut out).unwrap();
        assert_eq!(out, data);
        // A frame going on past the cluster: QEMU stops once the cluster is
        // full. It takes the buffered path, whose window is capped.
        let mut longer = data.clone();
        longer.extend_from_slice(&data);
        let mut out = vec![0u8; data.len()];
        unzstd(&frame(17, &longer), &mut out).unwrap();
        assert_eq!(out, data);
        let err = unzstd(&frame(27, &longer), &mut out).unwrap_err();
        assert!(matches!(err, crate::error::Error::CorruptImage(_)), "{err:?}");
        assert_eq!(zstd_window_log_max(2 << 20), 22);
        assert_eq!(zstd_window_log_max(512), ZSTD_MIN_WINDOW_LOG);
    }

    #[test]
    fn raw_deflate_with_trailing_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let mut c = e.finish().unwrap();
        c.extend_from_slice(&[0xaa; 100]);
        let mut out = vec![0u8; 4096];
        decompress(COMPRESSION_ZLIB, &c, &mut out).unwrap();
        assert_eq!(out, data);
        // Too short an output is corrupt, not a panic.
        let mut big = vec![0u8; 8192];
        assert!(decompress(COMPRESSION_ZLIB, &c, &mut big).is_err());
        assert!(decompress(COMPRESSION_ZLIB, &[0xff; 64], &mut out).is_err());
    }

    /// `n` pseudo-random bytes (xorshift32 from `seed`).
    fn xorshift(mut x: u32, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn encoded_clusters_decode_and_incompressible_ones_are_refused() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        for kind in [COMPRESSION_ZLIB, COMPRESSION_ZSTD] {
            let c = compress_cluster(kind, &data, 65536).unwrap().unwrap();
            assert!(c.len() < 65535);
            let mut out = vec![0u8; 65536];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
            // A short last cluster is padded with zeroes.
            let c = compress_cluster(kind, &data[..1000], 4096).unwrap().unwrap();
            let mut out = vec![1u8; 4096];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(&out[..1000], &data[..1000]);
            assert!(out[1000..].iter().all(|&b| b == 0));
            let noise: Vec<u8> = xorshift(0x1234_5678, 4096);
            assert_eq!(compress_cluster(kind, &noise, 4096).unwrap(), None);
            assert!(compress_cluster(kind, &data[..5000], 4096).is_err());
        }
        // Random bytes on a 16-letter alphabet: Huffman alone, still a
        // stream a 4 KiB-window inflater reads.
        let alpha: Vec<u8> = xorshift(99, 65536).iter().map(|b| b'A' + (b & 15)).collect();
        let c = compress_cluster(COMPRESSION_ZLIB, &alpha, 65536).unwrap().unwrap();
        assert!(c.len() < 65536 * 53 / 100, "{}", c.len());
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut out = Vec::with_capacity(65536);
        d.decompress_vec(&c, &mut out, flate2::FlushDecompress::Finish).unwrap();
        assert_eq!(out, alpha);
        // An output that does not fit is an error code, not a truncated stream.
        let cfg = zlib_rs::DeflateConfig {
            level: 6,
            method: zlib_rs::Method::Deflated,
            window_bits: -12,
            mem_level: 9,
            strategy: zlib_rs::Strategy::Default,
        };
        let mut small = vec![0u8; 100];
        assert_eq!(
            zlib_rs::compress_slice(&mut small, &alpha, cfg).1,
            zlib_rs::ReturnCode::BufError
        );
        // zlib streams stay inside a 4 KiB window, as QEMU inflates them.
        let mut rep = vec![0u8; 65536];
        for (i, b) in rep.iter_mut().enumerate() {
            *b = ((i % 5000) * 7 % 251) as u8;
        }
        let c = compress_cluster(COMPRESSION_ZLIB, &rep, 65536).unwrap().unwrap();
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut out = Vec::with_capacity(65536);
        d.decompress_vec(&c, &mut out, flate2::FlushDecompress::Finish).unwrap();
        assert_eq!(out, rep);
    }

    #[test]
    fn zstd_frame() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7) as u8).collect();
        let mut c = zstd::bulk::compress(&data, 3).unwrap();
        c.extend_from_slice(&[0; 33]);
        let mut out = vec![0u8; 65536];
        decompress(COMPRESSION_ZSTD, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(COMPRESSION_ZSTD, &[1, 2, 3, 4, 5], &mut out).is_err());
    }
}
