//! Deflate encoding of one compressed unit (a qcow2 cluster, a vmdk grain),
//! tuned for images: most units either do not compress at all (encrypted,
//! already compressed data) or compress no better than their bytes'
//! entropy, and a full deflate search is wasted on both.
//!
//! Each unit first gets one pass of zstd at its fastest level (tens of
//! times deflate's speed). When zstd cannot shrink it, deflate cannot
//! either in practice (zstd has the same means and a larger window): the
//! unit is reported incompressible. When zstd shrinks it no better than
//! its byte entropy (or than one bit a byte, the least a Huffman code
//! spends), LZ77 matches do not help, and Huffman coding alone
//! (no matches, so no window question) is as good as a full deflate and
//! several times faster. Otherwise a normal deflate at the caller's level.

use crate::error::{Error, Result};

/// The container of the deflate stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// Raw deflate (RFC 1951) whose matches reach back at most 4 KiB:
    /// QEMU inflates qcow2 clusters with windowBits -12.
    Raw4K,
    /// A zlib stream (RFC 1950: header, deflate, Adler-32), 32 KiB window:
    /// vmdk grains, which QEMU reads with zlib's uncompress().
    Zlib,
}

impl Container {
    fn window_bits(self) -> i32 {
        match self {
            Container::Raw4K => -12,
            Container::Zlib => 15,
        }
    }
}

/// `data` as one whole unit of `unit` bytes: a shorter one (the disk's
/// last) padded with zeroes; refused when it is longer.
pub fn whole_unit(data: &[u8], unit: usize) -> Result<std::borrow::Cow<'_, [u8]>> {
    if data.len() > unit {
        return Err(crate::error::invalid(format!(
            "{} bytes do not fit a {unit}-byte unit",
            data.len()
        )));
    }
    if data.len() == unit {
        return Ok(std::borrow::Cow::Borrowed(data));
    }
    let mut p = data.to_vec();
    p.resize(unit, 0);
    Ok(std::borrow::Cow::Owned(p))
}

/// zlib's default level (QEMU's Z_DEFAULT_COMPRESSION for both formats).
pub const LEVEL: i32 = 6;

/// `input` deflated into at most `limit` bytes, or None when it does not
/// compress (see the module text) or does not fit.
pub fn deflate(input: &[u8], limit: usize, container: Container) -> Result<Option<Vec<u8>>> {
    let mut out = vec![0u8; limit];
    let Ok(z) = zstd::bulk::compress_to_buffer(input, &mut out, 1) else {
        return Ok(None);
    };
    // Huffman codes spend at least one bit per byte, whatever the entropy.
    let huffman_floor = entropy_bytes(input).max(input.len() as f64 / 8.0);
    let strategy = if z as f64 >= 0.97 * huffman_floor {
        zlib_rs::Strategy::HuffmanOnly
    } else {
        zlib_rs::Strategy::Default
    };
    encode(input, out, LEVEL, strategy, container)
}

/// `input` as a zlib stream of stored (uncompressed) blocks: what a format
/// that must hold every unit compressed stores when the unit does not
/// compress. About 11 bytes more than the input per 64 KiB.
pub fn stored_zlib(input: &[u8]) -> Result<Vec<u8>> {
    let blocks = input.len().div_ceil(65535).max(1);
    let out = vec![0u8; input.len() + 5 * blocks + 6 + 64];
    encode(input, out, 0, zlib_rs::Strategy::Default, Container::Zlib)?
        .ok_or_else(|| Error::Internal("stored deflate blocks did not fit their computed size".into()))
}

fn encode(
    input: &[u8],
    mut out: Vec<u8>,
    level: i32,
    strategy: zlib_rs::Strategy,
    container: Container,
) -> Result<Option<Vec<u8>>> {
    let config = zlib_rs::DeflateConfig {
        level,
        method: zlib_rs::Method::Deflated,
        window_bits: container.window_bits(),
        mem_level: 9,
        strategy,
    };
    let (done, rc) = zlib_rs::compress_slice(&mut out, input, config);
    match rc {
        zlib_rs::ReturnCode::Ok => {
            let n = done.len();
            out.truncate(n);
            // Held in batches of thousands: keep only the bytes used.
            out.shrink_to_fit();
            Ok(Some(out))
        }
        zlib_rs::ReturnCode::BufError => Ok(None), // did not fit under the limit
        e => Err(Error::Internal(format!("deflate failed: {e:?}"))),
    }
}

/// Bytes an order-0 entropy coder needs for `data` (its byte histogram's
/// Shannon entropy): what Huffman coding alone can at best reach.
fn entropy_bytes(data: &[u8]) -> f64 {
    let mut h = [0u32; 256];
    for &b in data {
        h[b as usize] += 1;
    }
    let n = data.len() as f64;
    let bits: f64 = h
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    bits * n / 8.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(mut x: u32, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn unzlib(c: &[u8], n: usize) -> Vec<u8> {
        let mut d = flate2::Decompress::new(true);
        let mut out = Vec::with_capacity(n);
        assert_eq!(
            d.decompress_vec(c, &mut out, flate2::FlushDecompress::Finish).unwrap(),
            flate2::Status::StreamEnd
        );
        out
    }

    #[test]
    fn zlib_streams_decode_with_a_standard_inflater() {
        let text: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        let c = deflate(&text, 65535, Container::Zlib).unwrap().unwrap();
        assert!(c.len() < 2000);
        assert_eq!(unzlib(&c, 65536), text);
        // A run of one byte value has no entropy, but Huffman codes cost a
        // bit a byte: it must get matches, and shrink to almost nothing.
        let run = vec![0x5au8; 65536];
        let c = deflate(&run, 65535, Container::Zlib).unwrap().unwrap();
        assert!(c.len() < 200, "{}", c.len());
        assert_eq!(unzlib(&c, 65536), run);
        // Noise does not compress; stored blocks hold it, and decode.
        let n = noise(7, 65536);
        assert_eq!(deflate(&n, 65535, Container::Zlib).unwrap(), None);
        let s = stored_zlib(&n).unwrap();
        assert!(s.len() <= 65536 + 16, "{}", s.len());
        assert_eq!(unzlib(&s, 65536), n);
    }
}
