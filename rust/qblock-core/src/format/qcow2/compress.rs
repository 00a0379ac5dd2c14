//! Compressed clusters (docs/interop/qcow2.txt: "Compressed Clusters
//! Descriptor", "compression type"): zlib means a raw deflate stream
//! (no zlib header), zstd a zstd frame. The stored length is rounded up to
//! whole sectors, so trailing bytes after the stream are ignored; the output
//! must fill exactly one cluster.

use super::types::{COMPRESSION_ZLIB, COMPRESSION_ZSTD};
use crate::error::{corrupt, unsupported, Result};

pub fn decompress(kind: u8, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        COMPRESSION_ZLIB => crate::format::inflate::raw_exact(input, out),
        COMPRESSION_ZSTD => unzstd(input, out),
        t => Err(unsupported(format!("compression type {t}"))),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut d = Decoder::new().map_err(|e| corrupt(format!("zstd: {e}")))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        let hint = d
            .run(&mut inb, &mut outb)
            .map_err(|e| corrupt(format!("bad zstd data in a compressed cluster: {e}")))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
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
