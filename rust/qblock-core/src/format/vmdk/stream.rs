//! A streamOptimized vmdk written front to back (VMware's "stream-optimized
//! compressed sparse extent"): the header, whose grain directory is "at
//! the end", the embedded descriptor, then the compressed grains in guest
//! order, each behind its grain marker; each grain table follows the last
//! grain it maps (tables of no grain are left out: their directory entry
//! is 0); then the grain directory, a footer (the header again, with the
//! directory's place) and the end-of-stream marker. Every piece of
//! metadata is preceded by a marker sector naming it. Readers find the
//! directory through the footer, in the file's last three sectors.

use super::create::{check_adapter, check_descriptor_strings, hw_version, Ddb};
use super::header::{
    SparseHeader, COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_ZERO_GRAIN, GD_AT_END,
    MARKER_EOS, MARKER_FOOTER, MAX_EXTENT_FILE, SECTOR,
};
use super::sparse::{compress_grain, compressed_grains, push_grain};
use crate::error::{invalid, unsupported, Error, Result};
use crate::options::CreateOptions;
use crate::tools::convert::Target;
use crate::tools::stream::{Out, StreamTarget};
use parking_lot::Mutex;

const GRAIN: u64 = 65536;
const GTES_PER_GT: u64 = 512;
const GT_SPAN: u64 = GRAIN * GTES_PER_GT;
/// Descriptor sectors (QEMU's 20) and where grains start (one grain in).
const DESC_SECTORS: u64 = 20;
const OVERHEAD_SECTORS: u64 = 128;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;

struct State {
    out: Out,
    /// The grain table being filled, and its directory index.
    gt: Vec<u32>,
    gt_index: u64,
    gd: Vec<u32>,
    /// Guest offset below which every grain is written or passed.
    next: u64,
    finished: bool,
}

pub struct VmdkStream {
    state: Mutex<State>,
    size: u64,
    header: SparseHeader,
}

/// A metadata marker: `sectors` of metadata of `kind` follow.
fn marker(sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

impl VmdkStream {
    /// Start the stream of a disk of `size` bytes: header and descriptor
    /// are written at once. `opts` are vmdk creation options; the
    /// subformat must be streamOptimized (the default here).
    pub fn new(mut out: Out, size: u64, opts: &mut CreateOptions) -> Result<VmdkStream> {
        let size = size.next_multiple_of(SECTOR);
        let subformat = opts.take_str("subformat")?.unwrap_or_else(|| "streamOptimized".into());
        let adapter = opts.take_str("adapter_type")?.unwrap_or_else(|| "ide".into());
        let compat6 = opts.take_bool("compat6")?.unwrap_or(false);
        let hw = hw_version(compat6, opts.take_str("hwversion")?)?;
        let toolsversion = opts.take_str("toolsversion")?.unwrap_or_else(|| "2147483647".into());
        let zeroed_grain = opts.take_bool("zeroed_grain")?.unwrap_or(false);
        let backing = opts.take_str("backing_file")?.filter(|b| !b.is_empty());
        let _ = opts.take_str("backing_fmt")?;
        opts.finish("vmdk")?;
        if subformat != "streamOptimized" {
            return Err(unsupported(format!(
                "a {subformat} vmdk cannot be written to a stream: only streamOptimized can"
            )));
        }
        if backing.is_some() {
            return Err(unsupported("a vmdk written to a stream cannot have a backing file"));
        }
        check_adapter(&adapter)?;
        check_descriptor_strings(&[
            ("hwversion", Some(hw.as_str())),
            ("toolsversion", Some(toolsversion.as_str())),
        ])?;
        let gd_entries = size.div_ceil(GT_SPAN);
        // Grain offsets are 32-bit sectors: the same 2 TiB bound as a file.
        if size > MAX_EXTENT_FILE {
            return Err(invalid(format!(
                "a streamOptimized vmdk of {size} bytes is too large (grains are addressed below 2 TiB)"
            )));
        }
        let header = SparseHeader {
            version: 3,
            flags: FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER | if zeroed_grain { FLAG_ZERO_GRAIN } else { 0 },
            capacity: size / SECTOR,
            granularity: GRAIN / SECTOR,
            desc_offset: 1,
            desc_size: DESC_SECTORS,
            gtes_per_gt: GTES_PER_GT as u32,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            grain_offset: OVERHEAD_SECTORS,
            compress: COMPRESSION_DEFLATE,
        };
        let lines = format!("RW {} SPARSE \"stream.vmdk\"\n", size / SECTOR);
        let desc = Ddb {
            hw: &hw,
            adapter: &adapter,
            toolsversion: &toolsversion,
        }
        .descriptor("streamOptimized", 0xffff_ffff, "", &lines, size);
        if desc.len() as u64 > DESC_SECTORS * SECTOR {
            return Err(invalid("the vmdk descriptor is longer than its 10 KiB slot"));
        }
        out.put(&header.serialize())?;
        out.put(desc.as_bytes())?;
        out.zeroes(OVERHEAD_SECTORS * SECTOR - out.pos())?;
        Ok(VmdkStream {
            state: Mutex::new(State {
                out,
                gt: vec![0; GTES_PER_GT as usize],
                gt_index: 0,
                gd: vec![0; gd_entries as usize],
                next: 0,
                finished: false,
            }),
            size,
            header,
        })
    }
}

impl State {
    /// Write the grain table being filled, when it maps any grain.
    fn close_table(&mut self) -> Result<()> {
        if self.gt.iter().any(|&e| e != 0) {
            let gt_sectors = GTES_PER_GT * 4 / SECTOR;
            self.out.put(&marker(gt_sectors, MARKER_GT))?;
            self.gd[self.gt_index as usize] = sector_of(self.out.pos())?;
            let bytes: Vec<u8> = self.gt.iter().flat_map(|e| e.to_le_bytes()).collect();
            self.out.put(&bytes)?;
            self.gt.fill(0);
        }
        Ok(())
    }
}

fn sector_of(pos: u64) -> Result<u32> {
    u32::try_from(pos / SECTOR)
        .map_err(|_| Error::NoMemory("the streamOptimized vmdk passed 2 TiB (grain offsets are 32-bit sectors)".into()))
}

impl Target for VmdkStream {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn format_name(&self) -> String {
        "vmdk".into()
    }
    fn compressed_unit(&self) -> Option<u64> {
        Some(GRAIN)
    }
    fn compressed_only(&self) -> bool {
        true
    }
    fn compress_unit(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        compress_grain(data, GRAIN as usize).map(Some)
    }
    fn write_compressed(&self, units: &[(u64, &[u8])]) -> Result<()> {
        let mut st = self.state.lock();
        let mut buf = Vec::new();
        for (at, blob) in units {
            if !at.is_multiple_of(GRAIN) || *at < st.next || *at >= self.size {
                return Err(invalid(format!(
                    "a stream takes whole grains in guest order: not one at {at} after {}",
                    st.next
                )));
            }
            let index = at / GT_SPAN;
            if index != st.gt_index {
                st.close_table()?;
                st.gt_index = index;
            }
            let sector = sector_of(st.out.pos())?;
            buf.clear();
            push_grain(&mut buf, *at, blob);
            st.out.put(&buf)?;
            st.gt[((at % GT_SPAN) / GRAIN) as usize] = sector;
            st.next = at + GRAIN;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], at: u64) -> Result<()> {
        // Convert hands compressed units over; plain bytes are whole grains
        // here too.
        let blobs = compressed_grains(buf, at, GRAIN)?;
        let units: Vec<(u64, &[u8])> = blobs.iter().map(|(a, b)| (*a, &b[..])).collect();
        self.write_compressed(&units)
    }
    /// Grains not written read as zeroes: nothing to write.
    fn write_zeroes(&self, at: u64, _len: u64) -> Result<()> {
        if at < self.state.lock().next {
            return Err(invalid("a stream cannot go back to write zeroes"));
        }
        Ok(())
    }
    fn reads_zero(&self, at: u64, _len: u64) -> Result<bool> {
        Ok(at >= self.state.lock().next)
    }
    fn read_at(&self, _buf: &mut [u8], _at: u64) -> Result<()> {
        Err(unsupported("an image being written to a stream cannot be read"))
    }
}

impl StreamTarget for VmdkStream {
    fn finish(&self) -> Result<u64> {
        let mut st = self.state.lock();
        if std::mem::replace(&mut st.finished, true) {
            return Err(invalid("the stream is already finished"));
        }
        st.close_table()?;
        let gd_bytes: Vec<u8> = st.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
        let gd_sectors = (gd_bytes.len() as u64).div_ceil(SECTOR);
        st.out.put(&marker(gd_sectors, MARKER_GD))?;
        let gd_at = st.out.pos() / SECTOR;
        st.out.put(&gd_bytes)?;
        st.out.pad_to(SECTOR)?;
        st.out.put(&marker(1, MARKER_FOOTER))?;
        let footer = SparseHeader {
            gd_offset: gd_at,
            ..self.header.clone()
        };
        st.out.put(&footer.serialize())?;
        st.out.put(&marker(0, MARKER_EOS))?;
        st.out.flush()?;
        Ok(st.out.pos())
    }
}
