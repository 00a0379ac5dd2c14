//! Decoders for the compressed chunk types of a UDIF block map. Each one
//! fills an output buffer of exactly the chunk's size (its sector count
//! times 512, at most 64 MiB) and fails when the stream decodes to more or
//! less: memory is bounded by the output size, never by what the stream
//! claims. The zlib, bzip2 and lzfse decoders also take their input from
//! the storage in pieces of [`INPUT_PIECE`] bytes ([`Stored`]), so a long
//! stored length costs reads, not memory.
//!
//! - zlib (UDZO): a zlib stream (with its header and Adler-32), as QEMU's
//!   dmg.c inflates it: the stream must end exactly at the chunk's size.
//! - bzip2 (UDBZ): one bzip2 stream (QEMU's dmg-bz2.c requires its end too).
//! - lzfse (ULFO): an LZFSE stream (end-of-stream block required), decoded
//!   through `lzfse_rust`'s streaming reader so that a stream claiming more
//!   output than the chunk holds is cut off at the chunk's size.
//! - ADC (UDCO): Apple Data Compression, a byte-oriented LZ77 that QEMU does
//!   not read. Decoded here from the public description of its three
//!   opcodes (the opcode table in the README of the go-compressions/adc Go
//!   package, and the worked example of the `adc` crate's documentation):
//!   `1xxxxxxx` = a literal run of x+1 bytes that follow; `01xxxxxx hh ll`
//!   = copy x+4 bytes from distance (hh ll)+1 back; `00xxxxyy yyyyyyyy` =
//!   copy x+3 bytes from distance y+1 back. A copy may overlap its own
//!   output (that is how runs are coded), so it goes byte by byte. A stream
//!   has no length or end marker: it must produce exactly the chunk's size;
//!   bytes left over once the output is full are ignored.

use crate::backend::Storage;
use crate::error::{corrupt, try_zeroed, Result};
use std::io::Read;

/// How much of a stored chunk is read at a time: the input buffer stays this
/// small however long the chunk's stored bytes are (cloop allows 128 MiB).
pub const INPUT_PIECE: usize = 256 << 10;

/// A chunk's stored bytes, handed to a decoder piece by piece.
pub trait Pieces {
    /// The next piece, or None once every byte was handed out.
    fn next_piece(&mut self) -> Result<Option<&[u8]>>;
    /// Bytes in all (for messages).
    fn total(&self) -> u64;
}

/// A chunk already in memory: one piece.
pub struct Whole<'a>(pub &'a [u8], pub bool);

impl<'a> Whole<'a> {
    pub fn new(b: &'a [u8]) -> Whole<'a> {
        Whole(b, false)
    }
}

impl Pieces for Whole<'_> {
    fn next_piece(&mut self) -> Result<Option<&[u8]>> {
        if self.1 {
            return Ok(None);
        }
        self.1 = true;
        Ok(Some(self.0))
    }
    fn total(&self) -> u64 {
        self.0.len() as u64
    }
}

/// `len` bytes of a storage from `offset`, read a piece at a time.
pub struct Stored<'a> {
    storage: &'a dyn Storage,
    offset: u64,
    len: u64,
    read: u64,
    buf: Vec<u8>,
    /// `buf[at..have]` is read from the storage but not yet handed out.
    at: usize,
    have: usize,
}

impl<'a> Stored<'a> {
    pub fn new(storage: &'a dyn Storage, offset: u64, len: u64) -> Result<Stored<'a>> {
        Self::with_piece(storage, offset, len, INPUT_PIECE)
    }
    pub fn with_piece(storage: &'a dyn Storage, offset: u64, len: u64, piece: usize) -> Result<Stored<'a>> {
        let buf = try_zeroed(len.min(piece.max(1) as u64) as usize, "a compressed chunk's input")?;
        Ok(Stored {
            storage,
            offset,
            len,
            read: 0,
            buf,
            at: 0,
            have: 0,
        })
    }
    fn fill(&mut self) -> Result<usize> {
        let n = (self.len - self.read).min(self.buf.len() as u64) as usize;
        if n > 0 {
            self.storage.read_at(&mut self.buf[..n], self.offset + self.read)?;
            self.read += n as u64;
        }
        (self.at, self.have) = (0, n);
        Ok(n)
    }
}

impl Pieces for Stored<'_> {
    fn next_piece(&mut self) -> Result<Option<&[u8]>> {
        if self.fill()? == 0 {
            return Ok(None);
        }
        Ok(Some(&self.buf[..self.have]))
    }
    fn total(&self) -> u64 {
        self.len
    }
}

impl Read for Stored<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.have && self.fill().map_err(std::io::Error::other)? == 0 {
            return Ok(0);
        }
        let n = out.len().min(self.have - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Inflate a zlib stream into exactly `out.len()` bytes.
pub fn zlib(input: &[u8], out: &mut [u8]) -> Result<()> {
    zlib_pieces(&mut Whole::new(input), out)
}

/// Inflate a zlib stream, given in pieces, into exactly `out.len()` bytes.
pub fn zlib_pieces(src: &mut dyn Pieces, out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(true);
    stream_pieces("zlib", src, out, |input, out| {
        let (i, o) = (d.total_in(), d.total_out());
        let st = d
            .decompress(input, out, FlushDecompress::None)
            .map_err(|e| corrupt(format!("bad zlib data: {e}")))?;
        Ok((
            (d.total_in() - i) as usize,
            (d.total_out() - o) as usize,
            st == Status::StreamEnd,
        ))
    })
}

/// Decompress one bzip2 stream into exactly `out.len()` bytes.
pub fn bzip2(input: &[u8], out: &mut [u8]) -> Result<()> {
    bzip2_pieces(&mut Whole::new(input), out)
}

/// Decompress one bzip2 stream, given in pieces, into exactly `out.len()` bytes.
pub fn bzip2_pieces(src: &mut dyn Pieces, out: &mut [u8]) -> Result<()> {
    use bzip2::{Decompress, Status};
    let mut d = Decompress::new(false);
    stream_pieces("bzip2", src, out, |input, out| {
        let (i, o) = (d.total_in(), d.total_out());
        let st = d
            .decompress(input, out)
            .map_err(|e| corrupt(format!("bad bzip2 data: {e}")))?;
        Ok((
            (d.total_in() - i) as usize,
            (d.total_out() - o) as usize,
            st == Status::StreamEnd,
        ))
    })
}

/// Feed `src`'s pieces to a streaming decoder's `step` (input, room for
/// output -> bytes used, bytes produced, whether the stream ended) until
/// the stream ends, which must be exactly at the end of `out`.
fn stream_pieces(
    name: &str,
    src: &mut dyn Pieces,
    out: &mut [u8],
    mut step: impl FnMut(&[u8], &mut [u8]) -> Result<(usize, usize, bool)>,
) -> Result<()> {
    let total = src.total();
    let (mut used_in, mut done) = (0u64, 0usize);
    let cut_short = |used_in: u64, len: usize| {
        corrupt(format!(
            "{name} stream does not end within {len} bytes of output ({used_in} of {total} input bytes used)"
        ))
    };
    while let Some(piece) = src.next_piece()? {
        let mut used = 0usize;
        loop {
            let (i, o, ended) = step(&piece[used..], &mut out[done..])?;
            used += i;
            used_in += i as u64;
            done += o;
            if ended {
                if done != out.len() {
                    return Err(corrupt(format!(
                        "{name} stream decodes to {done} bytes, not {}",
                        out.len()
                    )));
                }
                return Ok(());
            }
            if i == 0 && o == 0 {
                break;
            }
        }
        if used < piece.len() {
            // No progress with input left: the output is full and the
            // stream wants to go on.
            return Err(cut_short(used_in, out.len()));
        }
    }
    Err(cut_short(used_in, out.len()))
}

/// Decode an LZFSE stream into exactly `out.len()` bytes.
pub fn lzfse(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut dec = lzfse_rust::LzfseRingDecoder::default();
    lzfse_read(dec.reader_bytes(input), out)
}

/// Decode an LZFSE stream read from a storage into exactly `out.len()` bytes.
pub fn lzfse_stored(input: Stored<'_>, out: &mut [u8]) -> Result<()> {
    let mut dec = lzfse_rust::LzfseRingDecoder::default();
    lzfse_read(dec.reader(input), out)
}

fn lzfse_read(mut r: impl Read, out: &mut [u8]) -> Result<()> {
    let bad = |e: std::io::Error| corrupt(format!("bad lzfse data: {e}"));
    let mut done = 0;
    while done < out.len() {
        let n = r.read(&mut out[done..]).map_err(bad)?;
        if n == 0 {
            return Err(corrupt(format!(
                "lzfse stream decodes to {done} bytes, not {}",
                out.len()
            )));
        }
        done += n;
    }
    // The stream must end here (its end-of-stream block is checked by the
    // reader returning 0), not go on past the chunk.
    let mut extra = [0u8; 1];
    if r.read(&mut extra).map_err(bad)? != 0 {
        return Err(corrupt(format!(
            "lzfse stream decodes to more than {} bytes",
            out.len()
        )));
    }
    Ok(())
}

/// Decode an ADC stream into exactly `out.len()` bytes.
pub fn adc(input: &[u8], out: &mut [u8]) -> Result<()> {
    let short = || corrupt("ADC chunk ends in the middle of an opcode");
    let (mut i, mut o) = (0usize, 0usize);
    while o < out.len() {
        let op = *input
            .get(i)
            .ok_or_else(|| corrupt(format!("ADC chunk decodes to {o} bytes, not {}", out.len())))?;
        if op & 0x80 != 0 {
            let n = (op & 0x7f) as usize + 1;
            let lit = input.get(i + 1..i + 1 + n).ok_or_else(short)?;
            if o + n > out.len() {
                return Err(corrupt(format!(
                    "ADC literal run overflows the {}-byte chunk",
                    out.len()
                )));
            }
            out[o..o + n].copy_from_slice(lit);
            i += 1 + n;
            o += n;
            continue;
        }
        let (n, dist) = if op & 0x40 != 0 {
            let b = input.get(i + 1..i + 3).ok_or_else(short)?;
            i += 3;
            ((op & 0x3f) as usize + 4, u16::from_be_bytes([b[0], b[1]]) as usize + 1)
        } else {
            let b = *input.get(i + 1).ok_or_else(short)?;
            i += 2;
            (
                ((op >> 2) & 0x0f) as usize + 3,
                (((op & 0x03) as usize) << 8 | b as usize) + 1,
            )
        };
        if dist > o {
            return Err(corrupt(format!(
                "ADC copy reaches {dist} bytes back with only {o} decoded"
            )));
        }
        if o + n > out.len() {
            return Err(corrupt(format!("ADC copy overflows the {}-byte chunk", out.len())));
        }
        for k in o..o + n {
            out[k] = out[k - dist];
        }
        o += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| ((i * 7) % 251) as u8 ^ (i >> 9) as u8).collect()
    }

    #[test]
    fn zlib_exact_size_only() {
        let data = pattern(8192);
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let c = e.finish().unwrap();
        let mut out = vec![0u8; 8192];
        zlib(&c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(zlib(&c, &mut vec![0u8; 8704]).is_err(), "stream shorter than the chunk");
        assert!(zlib(&c, &mut vec![0u8; 7680]).is_err(), "stream longer than the chunk");
        assert!(zlib(&c[..c.len() - 5], &mut out).is_err(), "truncated stream");
        assert!(zlib(&[0x78, 0x9c, 0xff, 0xff], &mut out).is_err());
        assert!(zlib(&[], &mut out).is_err());
    }

    #[test]
    fn bzip2_exact_size_only() {
        let data = pattern(4096);
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        e.write_all(&data).unwrap();
        let c = e.finish().unwrap();
        let mut out = vec![0u8; 4096];
        bzip2(&c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(bzip2(&c, &mut vec![0u8; 4608]).is_err());
        assert!(bzip2(&c, &mut vec![0u8; 3584]).is_err());
        assert!(bzip2(&c[..c.len() / 2], &mut out).is_err());
        assert!(bzip2(b"BZh9garbage-garbage-garbage", &mut out).is_err());
    }

    #[test]
    fn lzfse_exact_size_only() {
        let data = pattern(70_000);
        let mut c = Vec::new();
        lzfse_rust::LzfseEncoder::default().encode_bytes(&data, &mut c).unwrap();
        let mut out = vec![0u8; data.len()];
        lzfse(&c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(lzfse(&c, &mut vec![0u8; data.len() + 512]).is_err());
        assert!(lzfse(&c, &mut vec![0u8; data.len() - 512]).is_err());
        assert!(lzfse(&c[..c.len() - 4], &mut out).is_err(), "no end-of-stream block");
        assert!(lzfse(b"bvx2\xff\xff\xff\xffjunk", &mut out).is_err());
    }

    /// `c` stored at 100 in a memory storage, handed out `piece` bytes at a time.
    fn stored(c: &[u8]) -> crate::backend::memory::MemoryStorage {
        let mut b = vec![0xeeu8; 100];
        b.extend_from_slice(c);
        b.extend_from_slice(&[0xee; 50]);
        crate::backend::memory::MemoryStorage::new(b, true)
    }

    #[test]
    fn streaming_decoders_take_any_piece_size() {
        let data = pattern(70_000);
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let z = e.finish().unwrap();
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        e.write_all(&data).unwrap();
        let bz = e.finish().unwrap();
        let mut lz = Vec::new();
        lzfse_rust::LzfseEncoder::default()
            .encode_bytes(&data, &mut lz)
            .unwrap();
        for piece in [1, 7, 4096, INPUT_PIECE] {
            let mut out = vec![0u8; data.len()];
            let s = stored(&z);
            zlib_pieces(
                &mut Stored::with_piece(&s, 100, z.len() as u64, piece).unwrap(),
                &mut out,
            )
            .unwrap();
            assert_eq!(out, data, "zlib, pieces of {piece}");
            // The trailing bytes after the stream are never needed.
            let mut out2 = vec![0u8; data.len()];
            zlib_pieces(
                &mut Stored::with_piece(&s, 100, z.len() as u64 + 50, piece).unwrap(),
                &mut out2,
            )
            .unwrap();
            assert_eq!(out2, data);
            let short = Stored::with_piece(&s, 100, z.len() as u64 - 3, piece).unwrap();
            assert!(zlib_pieces(&mut { short }, &mut out).is_err(), "truncated zlib");
            let mut long = vec![0u8; data.len() + 512];
            let st = Stored::with_piece(&s, 100, z.len() as u64, piece).unwrap();
            assert!(
                zlib_pieces(&mut { st }, &mut long).is_err(),
                "zlib shorter than the chunk"
            );
            let mut cut = vec![0u8; data.len() - 512];
            let st = Stored::with_piece(&s, 100, z.len() as u64, piece).unwrap();
            assert!(
                zlib_pieces(&mut { st }, &mut cut).is_err(),
                "zlib longer than the chunk"
            );

            let s = stored(&bz);
            let mut out = vec![0u8; data.len()];
            bzip2_pieces(
                &mut Stored::with_piece(&s, 100, bz.len() as u64, piece).unwrap(),
                &mut out,
            )
            .unwrap();
            assert_eq!(out, data, "bzip2, pieces of {piece}");
            let short = Stored::with_piece(&s, 100, bz.len() as u64 / 2, piece).unwrap();
            assert!(bzip2_pieces(&mut { short }, &mut out).is_err(), "truncated bzip2");

            let s = stored(&lz);
            let mut out = vec![0u8; data.len()];
            lzfse_stored(Stored::with_piece(&s, 100, lz.len() as u64, piece).unwrap(), &mut out).unwrap();
            assert_eq!(out, data, "lzfse, pieces of {piece}");
            let short = Stored::with_piece(&s, 100, lz.len() as u64 - 4, piece).unwrap();
            assert!(lzfse_stored(short, &mut out).is_err(), "lzfse without its end");
        }
    }

    #[test]
    fn stored_input_buffer_is_one_piece() {
        // A stored length of 128 MiB costs a 256 KiB buffer, not 128 MiB.
        let s = crate::backend::memory::MemoryStorage::new(vec![0u8; 1024], true);
        let st = Stored::new(&s, 0, 128 << 20).unwrap();
        assert_eq!(st.buf.len(), INPUT_PIECE);
        let mut out = vec![0u8; 4096];
        let st = Stored::new(&s, 0, 128 << 20).unwrap();
        assert!(zlib_pieces(&mut { st }, &mut out).is_err());
    }

    #[test]
    fn adc_opcodes() {
        // The `adc` crate's documented example: a literal run of four bytes,
        // a two-byte copy (3 bytes from distance 1), a three-byte copy (4
        // bytes from distance 7).
        let input = [0x83, 0xfe, 0xed, 0xfa, 0xce, 0x00, 0x00, 0x40, 0x00, 0x06];
        let mut out = [0u8; 11];
        adc(&input, &mut out).unwrap();
        assert_eq!(out, [0xfe, 0xed, 0xfa, 0xce, 0xce, 0xce, 0xce, 0xfe, 0xed, 0xfa, 0xce]);
        // Longest forms: 128 literals, a 67-byte copy, an 18-byte copy at distance 1024.
        let mut s = vec![0xffu8];
        s.extend((0..128u32).map(|i| i as u8));
        s.extend([0x7f, 0x00, 0x7f]); // 67 bytes from distance 128
        s.extend([0x3f, 0xff]); // 18 bytes from distance 1024? only 195 decoded: refused
        let mut out = vec![0u8; 128 + 67 + 18];
        assert!(adc(&s, &mut out).is_err());
        s.truncate(s.len() - 2);
        s.extend([0x3c, 0x00]); // 18 bytes from distance 1
        adc(&s, &mut out).unwrap();
        assert_eq!(&out[..128], &(0..128u32).map(|i| i as u8).collect::<Vec<_>>()[..]);
        assert_eq!(&out[128..195], &out[..67]);
        assert!(out[195..].iter().all(|&b| b == out[194]));
    }

    #[test]
    fn adc_hostile_streams() {
        let mut out = [0u8; 16];
        assert!(adc(&[], &mut out).is_err(), "empty stream");
        assert!(adc(&[0x85, 1, 2], &mut out).is_err(), "literal run past the input");
        assert!(adc(&[0x00, 0x00], &mut out).is_err(), "copy before any output");
        assert!(adc(&[0x80, 1, 0x40], &mut out).is_err(), "three-byte opcode cut short");
        assert!(
            adc(&[0x80, 1, 0x7f, 0x00, 0x00], &mut out).is_err(),
            "copy past the chunk"
        );
        assert!(adc(&[0x9f; 40], &mut out).is_err(), "literal run past the chunk");
        // Exactly full, trailing bytes ignored.
        let mut s = vec![0x8f];
        s.extend(0..16u8);
        s.extend([0x12, 0x34]);
        adc(&s, &mut out).unwrap();
        assert_eq!(out.to_vec(), (0..16u8).collect::<Vec<_>>());
    }
}
