//! `convert` to a stream (a pipe, stdout, a socket): an image laid out in
//! one pass, front to back, with no seek and nothing read back, in a
//! format that allows it.
//!
//! - qcow2: where every table goes is fixed before the first byte, from
//!   the sources' block status: header, L1 table, one slot per cluster that
//!   block status says holds data (in guest order), then the L2 tables and
//!   the refcount structures, whose contents are known only at the end.
//!   A slot whose bytes turn out all zero is left out of the tables (a free
//!   cluster of zeroes on the wire). Compressed clusters cannot be streamed
//!   this way: their sizes, so the tables, are not known in advance.
//! - streamOptimized vmdk: VMware's stream layout: header (its directory
//!   "at the end"), descriptor, compressed grains with their markers, each
//!   grain table after its grains, then the grain directory, a footer and
//!   an end-of-stream marker. Grains are compressed by the workers.
//!
//! Raw streams need no layout and are written by the Python layer.

use super::convert::{self, ConvertOptions, Piece, Target};
use super::Progress;
use crate::error::{invalid, unsupported, Error, Result};
use crate::format_name::Format;
use crate::options::CreateOptions;
use std::io::Write;

/// A writer that counts what it wrote: where the next byte lands in the
/// image being laid out.
pub struct Out {
    w: Box<dyn Write + Send>,
    pos: u64,
}

static ZEROES: [u8; 65536] = [0u8; 65536];

impl Out {
    pub fn new(w: Box<dyn Write + Send>) -> Out {
        Out { w, pos: 0 }
    }
    pub fn pos(&self) -> u64 {
        self.pos
    }
    pub fn put(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b).map_err(|e| Error::os("writing the stream", e))?;
        self.pos += b.len() as u64;
        Ok(())
    }
    pub fn zeroes(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            let k = n.min(ZEROES.len() as u64);
            self.put(&ZEROES[..k as usize])?;
            n -= k;
        }
        Ok(())
    }
    /// Zeroes up to the next multiple of `align`.
    pub fn pad_to(&mut self, align: u64) -> Result<()> {
        self.zeroes(self.pos.next_multiple_of(align) - self.pos)
    }
    pub fn flush(&mut self) -> Result<()> {
        self.w.flush().map_err(|e| Error::os("writing the stream", e))
    }
}

/// A format laid out on a stream: convert writes into it in guest order,
/// then `finish` writes what follows the data.
pub trait StreamTarget: Target {
    fn finish(&self) -> Result<u64>;
}

/// Guest ranges `(start, len)` the sources' block status says may hold
/// data, in order and merged: what a stream must leave room for.
pub fn data_ranges(pieces: &[Piece<'_>]) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut base = 0u64;
    for p in pieces {
        let mut pos = p.start;
        let end = p.start + p.len;
        while pos < end {
            let st = p.image.block_status(pos, end - pos)?;
            let n = st.len.min(end - pos).max(1);
            if !st.zero || st.data {
                let at = base + (pos - p.start);
                match out.last_mut() {
                    Some((s, l)) if *s + *l == at => *l += n,
                    _ => out.push((at, n)),
                }
            }
            pos += n;
        }
        base += p.len;
    }
    Ok(out)
}

/// Write the concatenated `pieces` as a new `format` image with `options`
/// (as for creating one; its size defaults to the pieces' length) to
/// `sink`, front to back. Returns the bytes written.
pub fn convert_to_stream(
    pieces: &[Piece<'_>],
    format: Format,
    options: &mut CreateOptions,
    sink: Box<dyn Write + Send>,
    opts: &ConvertOptions,
    progress: &mut dyn Progress,
) -> Result<u64> {
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    let size = options.take_u64("size")?.unwrap_or(total);
    if size < total {
        return Err(invalid(format!(
            "the target size {size} is smaller than the {total} bytes to copy"
        )));
    }
    let out = Out::new(sink);
    let target: Box<dyn StreamTarget> = match format {
        Format::Qcow2 => {
            if opts.compress {
                return Err(unsupported(
                    "compressed qcow2 cannot be written to a stream: its tables come before the \
                     clusters, whose compressed sizes are not known in advance (write it to a file, \
                     or stream a streamOptimized vmdk)",
                ));
            }
            let plan = data_ranges(pieces)?;
            Box::new(crate::format::qcow2::stream::Qcow2Stream::new(
                out, size, options, plan,
            )?)
        }
        Format::Vmdk => Box::new(crate::format::vmdk::stream::VmdkStream::new(out, size, options)?),
        f => {
            return Err(unsupported(format!(
                "{f} images cannot be written to a stream (raw, qcow2 and streamOptimized vmdk can)"
            )))
        }
    };
    convert::convert(pieces, target.as_ref(), opts, progress)?;
    target.finish()
}
