//! An open image: one driver per layer of its backing chain, and the loops
//! every format shares — bounds checks, reads that fall through to the
//! backing image, block status with depth, `map`, `check_allocation`.

use crate::backend::{Perm, Storage};
use crate::driver::{BackingRef, Below, CheckReport, Driver, HostFile, Mapped, NoBacking, Repair, SnapshotInfo};
use crate::error::{corrupt, invalid, unsupported, Error, Result};
use crate::format_name::Format;
use crate::info::InfoValue;
use crate::location::Location;
use crate::options::{CreateOptions, OptValue};
use crate::reference::{RefKind, RefRules, References};
use crate::registry::{self, OpenCtx};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Longest backing chain we open. QEMU has no fixed cap but detects loops;
/// a cap also bounds file descriptors and the recursion of status queries.
pub const MAX_CHAIN_DEPTH: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Do not open the backing file (reads of unallocated ranges give zeroes).
    pub no_backing: bool,
    /// Flush after every write (the seed's default without O_CACHE_WB).
    pub write_through: bool,
    /// Make every flush a no-op, the drivers' own ordering barriers too
    /// (O_NO_FLUSH, QEMU's cache=unsafe): fast, but a crash may leave the
    /// image inconsistent. The top image's file only.
    pub no_flush: bool,
    /// Bypass the host page cache (O_NOCACHE: O_DIRECT) for every file of
    /// the chain.
    pub direct: bool,
    /// Writes go to a temporary qcow2 overlay, discarded at close; the
    /// image itself is opened read-only (O_SNAPSHOT, QEMU's `-snapshot`).
    pub snapshot: bool,
    /// Open the top image to be checked: see [`OpenCtx::check`]. The
    /// backing files open as usual.
    pub check: bool,
    /// Lock every file sharing everything, as `qemu-img -U` (force-share):
    /// the image may be open for writing elsewhere (a running VM), and
    /// what is read may then be inconsistent. Read-only opens only.
    pub force_share: bool,
    /// Which files named by the images of the chain may be opened; the
    /// default follows any, as QEMU.
    pub references: References,
    /// Follow names with a protocol prefix (`nbd://...`, `json:{...}`):
    /// off by default, as an untrusted image could aim them anywhere.
    pub allow_protocols: bool,
}

/// Allocation of one run, across the whole chain (the seed's and
/// `qemu-img map`'s view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    pub offset: u64,
    pub len: u64,
    /// Allocated in the top layer (the seed's `check_allocation` meaning).
    pub allocated: bool,
    /// Allocated in some layer of the chain (`qemu-img map`'s `present`).
    pub present: bool,
    pub data: bool,
    pub zero: bool,
    pub compressed: bool,
    /// Layer that answered: 0 is the top image.
    pub depth: u32,
    /// Where the bytes are, when known: the host file's name and offset.
    pub host: Option<(String, u64)>,
}

/// Static information about an open image.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub filename: String,
    pub format: Format,
    pub virtual_size: u64,
    pub actual_size: Option<u64>,
    pub backing_filename: Option<String>,
    pub full_backing_filename: Option<String>,
    pub backing_format: Option<String>,
    pub encrypted: bool,
    pub cluster_size: Option<u64>,
    pub dirty: bool,
    pub format_specific: Vec<(String, InfoValue)>,
}

pub struct Image {
    driver: Box<dyn Driver>,
    location: Location,
    backing: Option<Box<Image>>,
    read_only: bool,
    write_through: bool,
    no_flush: bool,
    /// This layer is the temporary overlay of an O_SNAPSHOT open: the image
    /// the user opened is `backing`, and queries answer for it (see
    /// `block_status`, `info`).
    snapshot: bool,
    closed: AtomicBool,
}

impl Image {
    /// Open an image and its backing chain. `format` None probes the top
    /// image; backing images use the format the image above records, and
    /// are probed only when none is recorded.
    pub fn open(location: &Location, format: Option<Format>, opts: &OpenOptions) -> Result<Image> {
        if opts.force_share && !opts.read_only {
            return Err(invalid(
                "force_share (-U) needs a read-only open, as QEMU's force-share",
            ));
        }
        let mut seen = vec![location.identity()];
        let rules = RefRules::new(location, &opts.references, opts.allow_protocols)?;
        if opts.snapshot && !opts.read_only {
            let base = Self::open_layer(location, format, true, !opts.no_backing, &mut seen, opts, &rules)?;
            return Self::snapshot_overlay(base);
        }
        Self::open_layer(
            location,
            format,
            opts.read_only,
            !opts.no_backing,
            &mut seen,
            opts,
            &rules,
        )
    }

    /// A writable temporary qcow2 above `base` (opened read-only), as QEMU's
    /// `-snapshot` makes one: created in a private directory under the
    /// temporary folder (`TMPDIR`) and unlinked as soon as it is open, so
    /// it disappears with the image even if the process dies. It records
    /// `base` as its backing file (absolute path and format), so discards
    /// and zero writes keep their meaning over a backing file; flushing it
    /// would buy nothing, so flush is a no-op.
    fn snapshot_overlay(base: Image) -> Result<Image> {
        let Location::File(path) = &base.location else {
            return Err(unsupported(format!(
                "O_SNAPSHOT over {} is not supported yet",
                base.location.describe()
            )));
        };
        let abs =
            std::path::absolute(path).map_err(|e| Error::os(format!("cannot resolve '{}'", path.display()), e))?;
        let dir = PrivateDir::new("qblock-snapshot-").map_err(|e| e.context("O_SNAPSHOT overlay"))?;
        let overlay = Location::file(dir.path.join("overlay.qcow2"));
        let mut copts = CreateOptions::new()
            .with("size", OptValue::Int(base.virtual_size()))
            .with("backing_file", OptValue::Str(abs.display().to_string()))
            .with("backing_fmt", OptValue::Str(base.format().to_string()));
        (registry::create_fn(Format::Qcow2)?)(&overlay, &mut copts)
            .map_err(|e| e.context("cannot create the O_SNAPSHOT overlay"))?;
        let storage = overlay.open_storage(false)?;
        let ctx = OpenCtx {
            location: &overlay,
            read_only: false,
            direct: false,
            check: false,
            force_share: false,
            refs: RefRules::any(),
            inspect: None,
        };
        let driver = (registry::open_fn(Format::Qcow2)?)(storage, &ctx)
            .map_err(|e| e.context("cannot open the O_SNAPSHOT overlay"))?;
        drop(dir); // the overlay lives on through its open descriptor only
        Ok(Image {
            driver,
            location: base.location.clone(),
            backing: Some(Box::new(base)),
            read_only: false,
            write_through: false,
            no_flush: true,
            snapshot: true,
            closed: AtomicBool::new(false),
        })
    }

    fn open_layer(
        location: &Location,
        format: Option<Format>,
        read_only: bool,
        with_backing: bool,
        seen: &mut Vec<String>,
        opts: &OpenOptions,
        rules: &RefRules,
    ) -> Result<Image> {
        let mut storage = location.open_storage_with(read_only, opts.direct)?;
        if opts.no_flush && !read_only {
            storage = Arc::new(crate::backend::Unsynced(storage));
        }
        let format = match format {
            Some(f) => f,
            None => {
                let f = registry::probe(storage.as_ref())?;
                if f == Format::Raw {
                    crate::events::probed_raw(location, read_only);
                }
                f
            }
        };
        // Locked before the driver opens: a writable open may repair the
        // image at once (a dirty qcow2, a vhdx log), which must not happen
        // under a VM that has it open.
        let perm = match format {
            Format::Raw if !opts.force_share => Perm::raw(read_only),
            _ => Perm::image(read_only, opts.force_share),
        };
        storage.lock(perm)?;
        let ctx = OpenCtx {
            location,
            read_only,
            direct: opts.direct,
            check: opts.check && seen.len() == 1, // the top layer only
            force_share: opts.force_share,
            refs: rules,
            inspect: None,
        };
        let driver = (registry::open_fn(format)?)(storage, &ctx)
            .map_err(|e| e.context(format!("{} image '{}'", format, location.describe())))?;
        let mut backing = None;
        if with_backing {
            if let Some(b) = driver.backing() {
                backing = Some(Box::new(Self::open_backing(location, &b, seen, opts, rules)?));
            }
        }
        Ok(Image {
            driver,
            location: location.clone(),
            backing,
            read_only,
            write_through: opts.write_through,
            no_flush: opts.no_flush,
            snapshot: false,
            closed: AtomicBool::new(false),
        })
    }

    fn open_backing(
        top: &Location,
        b: &BackingRef,
        seen: &mut Vec<String>,
        opts: &OpenOptions,
        rules: &RefRules,
    ) -> Result<Image> {
        if seen.len() >= MAX_CHAIN_DEPTH {
            return Err(corrupt(format!(
                "backing chain is deeper than {MAX_CHAIN_DEPTH} images"
            )));
        }
        let loc = top.relative(&b.filename);
        // Before anything touches it (even a stat for the loop check).
        rules
            .admit(RefKind::Backing, &b.filename, &loc)
            .map_err(|e| e.context(format!("'{}'", top.describe())))?;
        let id = loc.identity();
        if seen.contains(&id) {
            return Err(corrupt(format!(
                "backing chain loops: '{}' is its own ancestor",
                b.filename
            )));
        }
        seen.push(id);
        let fmt = match &b.format {
            Some(name) => Some(Format::from_name(name).ok_or_else(|| {
                corrupt(format!(
                    "unknown backing format '{name}' recorded in '{}'",
                    top.describe()
                ))
            })?),
            None => None,
        };
        Self::open_layer(&loc, fmt, true, true, seen, opts, rules)
            .map_err(|e| e.context(format!("cannot open backing file '{}'", b.filename)))
    }

    /// Create an image. Generic options are resolved here for every format:
    /// a size of 0 with a backing file takes the backing file's size, and a
    /// backing file may not be the new image itself.
    pub fn create(location: &Location, format: Format, mut opts: CreateOptions) -> Result<()> {
        let create = registry::create_fn(format)?;
        let backing = match opts.peek("backing_file") {
            Some(OptValue::Str(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        if let Some(b) = &backing {
            let bloc = location.relative(b);
            if bloc.identity() == location.identity() {
                return Err(invalid(format!("backing file '{b}' is the image being created")));
            }
            let size = match opts.peek("size") {
                Some(OptValue::Int(s)) => *s,
                None => 0,
                Some(_) => return Err(invalid("option 'size' must be an integer")),
            };
            if size == 0 {
                let bfmt = match opts.peek("backing_fmt") {
                    Some(OptValue::Str(s)) => {
                        Some(Format::from_name(s).ok_or_else(|| invalid(format!("unknown backing format '{s}'")))?)
                    }
                    _ => None,
                };
                let ro = OpenOptions {
                    read_only: true,
                    ..Default::default()
                };
                let bimg = Image::open(&bloc, bfmt, &ro)
                    .map_err(|e| e.context(format!("cannot open backing file '{b}' to take its size")))?;
                opts.set("size", OptValue::Int(bimg.virtual_size()));
            }
        }
        create(location, &mut opts)
    }

    /// The image the user opened: the one below an O_SNAPSHOT overlay.
    fn user_layer(&self) -> &Image {
        match (&self.backing, self.snapshot) {
            (Some(b), true) => b,
            _ => self,
        }
    }

    pub fn format(&self) -> Format {
        self.user_layer().driver.format()
    }
    pub fn virtual_size(&self) -> u64 {
        self.driver.virtual_size()
    }
    /// Opened without write access (O_RDWR not given).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn location(&self) -> &Location {
        &self.location
    }
    pub fn backing_image(&self) -> Option<&Image> {
        self.backing.as_deref()
    }
    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(invalid("the image is closed"));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange(format!(
                "range at {offset} of {len} bytes is beyond the virtual size {size}"
            ))),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(invalid(format!("'{}' is open read-only", self.location.describe())));
        }
        Ok(())
    }

    /// Fill `buf` with guest bytes from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_open()?;
        self.check_range(offset, buf.len() as u64)?;
        self.read_layer(buf, offset)
    }

    fn read_layer(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Encoded runs (compressed clusters, grains, chunks) are decoded
        // after the loop, all of them at once on the worker pool when there
        // are several: holes between compressed clusters would otherwise
        // cut a read into runs too short to decode in parallel.
        let mut encoded: Vec<(&mut [u8], u64)> = Vec::new();
        let mut rest = buf;
        let mut pos = offset;
        while !rest.is_empty() {
            let want = rest.len() as u64;
            let m = self.driver.map(pos, want)?;
            let n = m.len.min(want) as usize;
            if n == 0 {
                return Err(Error::Internal(format!(
                    "{} driver mapped an empty run at {pos}",
                    self.format()
                )));
            }
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(n);
            match m.kind {
                Mapped::Data { file, offset } => self.host(file)?.read_at(chunk, offset)?,
                Mapped::Hole { .. } | Mapped::Zero { .. } => chunk.fill(0),
                Mapped::Encoded => encoded.push((chunk, pos)),
                Mapped::Unallocated => self.read_below_layer(chunk, pos)?,
            }
            rest = tail;
            pos += n as u64;
        }
        // Only several runs go to the pool: a call into it is a cross-thread
        // hand-off even with nothing to do.
        if encoded.len() <= 1 {
            return encoded
                .into_iter()
                .try_for_each(|(chunk, at)| self.driver.read_encoded(chunk, at));
        }
        use rayon::prelude::*;
        encoded
            .into_par_iter()
            .try_for_each(|(chunk, at)| self.driver.read_encoded(chunk, at))
    }

    /// Read what lies under this layer: the backing image, zeroes past its end.
    fn read_below_layer(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            None => buf.fill(0),
            Some(b) => {
                let bsize = b.virtual_size();
                let inside = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
                if inside > 0 {
                    b.read_layer(&mut buf[..inside], offset)?;
                }
                buf[inside..].fill(0);
            }
        }
        Ok(())
    }

    fn host(&self, file: HostFile) -> Result<&dyn Storage> {
        self.driver
            .host_file(file)
            .ok_or_else(|| Error::Internal(format!("{} driver mapped to unknown host file {file}", self.format())))
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_open()?;
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.driver.write_at(buf, offset, self.below())?;
        self.after_write()
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_open()?;
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.driver.write_zeroes(offset, len, self.below())?;
        self.after_write()
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_open()?;
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.driver.discard(offset, len)?;
        self.after_write()
    }

    fn below(&self) -> &dyn Below {
        match &self.backing {
            Some(b) => b.as_ref(),
            None => &NoBacking,
        }
    }

    fn after_write(&self) -> Result<()> {
        if self.write_through && !self.no_flush {
            self.driver.flush()?;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.check_open()?;
        if self.no_flush || self.read_only {
            return Ok(());
        }
        self.driver.flush()
    }

    /// Change the virtual size. Growing makes the new range read as
    /// zeroes: the bytes a format kept stored past the old end inside its
    /// last cluster (after a shrink) are zeroed, and an overlay does not
    /// show its backing file's bytes there (QEMU does the same).
    pub fn truncate(&self, size: u64) -> Result<()> {
        self.check_open()?;
        self.check_writable()?;
        let cur = self.virtual_size();
        self.driver.truncate(size)?;
        if size > cur {
            let mut zero_to = cur;
            if let Some(cs) = self.driver.info()?.cluster_size.filter(|c| c.is_power_of_two()) {
                zero_to = cur.div_ceil(cs).saturating_mul(cs);
            }
            if let Some(b) = &self.backing {
                zero_to = zero_to.max(b.virtual_size());
            }
            let zero_to = zero_to.min(size);
            if zero_to > cur {
                self.driver.write_zeroes(cur, zero_to - cur, self.below())?;
            }
        }
        self.after_write()
    }

    /// Check the image's own metadata (not its backing files'); repairs
    /// need the image open read-write (and, for a dirty qcow2, opened with
    /// [`OpenOptions::check`], or the open has already repaired it).
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        self.check_open()?;
        if repair != Repair::None {
            self.user_layer().check_writable()?; // never through an O_SNAPSHOT overlay
        }
        self.user_layer().driver.check(repair)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.check_open()?;
        self.user_layer().driver.snapshots()
    }

    // Snapshots belong to the image the user opened, as `snapshots()` lists
    // them: under O_SNAPSHOT that image is read-only, so changing them is
    // refused (not done in the throw-away overlay).
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        self.check_open()?;
        self.user_layer().check_writable()?;
        self.user_layer().driver.snapshot_create(name)
    }

    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        self.check_open()?;
        self.user_layer().check_writable()?;
        self.user_layer().driver.snapshot_apply(id_or_name)
    }

    pub fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        self.check_open()?;
        self.user_layer().check_writable()?;
        self.user_layer().driver.snapshot_delete(id_or_name)
    }

    /// See [`Driver::compressed_unit`].
    pub fn compressed_unit(&self) -> Option<u64> {
        self.driver.compressed_unit()
    }

    /// See [`Driver::compressed_only`].
    pub fn compressed_only(&self) -> bool {
        self.driver.compressed_only()
    }

    /// See [`Driver::compress_unit`].
    pub fn compress_unit(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        self.driver.compress_unit(data)
    }

    /// See [`Driver::write_compressed`]: every unit must lie inside the disk.
    pub fn write_compressed(&self, units: &[(u64, &[u8])]) -> Result<()> {
        self.check_open()?;
        self.check_writable()?;
        let unit = self
            .driver
            .compressed_unit()
            .ok_or_else(|| crate::error::unsupported(format!("{} cannot store compressed data", self.format())))?;
        for (off, _) in units {
            if !off.is_multiple_of(unit) || *off >= self.virtual_size() {
                return Err(invalid(format!(
                    "a compressed unit at {off} is not a whole unit of the disk"
                )));
            }
        }
        self.driver.write_compressed(units)?;
        self.after_write()
    }

    /// See [`Driver::make_empty`].
    pub fn make_empty(&self) -> Result<()> {
        self.check_open()?;
        self.check_writable()?;
        self.driver.make_empty()?;
        self.after_write()
    }

    /// See [`Driver::set_backing`]; reopen the image to read through the
    /// new chain.
    pub fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        self.check_open()?;
        self.check_writable()?;
        self.driver.set_backing(backing)
    }

    /// Flush and close; later calls on this image fail. Closing twice is an error.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(invalid("the image is already closed"));
        }
        let r = if self.read_only { Ok(()) } else { self.driver.close() };
        if let Some(b) = &self.backing {
            b.closed.store(true, Ordering::Release);
        }
        // The files stay open while other handles to this image live (a
        // reader still in flight): the locks go now, so that QEMU or
        // another open can take the image.
        self.release_locks();
        r
    }

    /// Give up the locks of this image and of the images below it while
    /// they stay open: for a job that opens one of them again for writing
    /// in this process (commit, whose base the chain holds read-only), as
    /// QEMU reopens the base read-write. `close` does it too.
    pub fn release_locks(&self) {
        for i in 0..=HostFile::MAX {
            match self.driver.host_file(i) {
                Some(s) => {
                    let _ = s.lock(Perm::NONE);
                }
                None => break,
            }
        }
        if let Some(b) = &self.backing {
            b.release_locks();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Status of the run starting at `offset`, at most `len` bytes long.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_open()?;
        if len == 0 {
            return Err(invalid("block status needs a length of at least 1"));
        }
        self.check_range(offset, len)?;
        let top = self.driver.map_status(offset, len)?;
        let len = top.len.clamp(1, len);
        let allocated = top.kind != Mapped::Unallocated;
        if let (Some(b), true, false) = (&self.backing, self.snapshot, allocated) {
            // What the session has not written is the opened image's own
            // answer: the overlay counts as part of its top layer.
            if offset < b.virtual_size() {
                return b.block_status(offset, len.min(b.virtual_size() - offset));
            }
        }
        let mut st = self.layer_status(offset, len, 0)?;
        st.allocated = allocated;
        Ok(st)
    }

    /// Whether the top layer holds `[start, start+len)`'s first byte, and
    /// for how many bytes that answer holds (at least one).
    fn top_allocation(&self, start: u64, len: u64) -> Result<(bool, u64)> {
        if self.snapshot {
            let st = self.block_status(start, len)?;
            return Ok((st.allocated, st.len));
        }
        let m = self.driver.map_status(start, len)?;
        Ok((m.kind != Mapped::Unallocated, m.len.clamp(1, len)))
    }

    fn layer_status(&self, offset: u64, len: u64, depth: u32) -> Result<BlockStatus> {
        let m = self.driver.map_status(offset, len)?;
        let len = m.len.clamp(1, len);
        let host = |file: HostFile, off: u64| self.driver.host_file(file).map(|s| (s.describe(), off));
        let mk = |present, data, zero, compressed, host| BlockStatus {
            offset,
            len,
            allocated: false,
            present,
            data,
            zero,
            compressed,
            depth,
            host,
        };
        Ok(match m.kind {
            Mapped::Data { file, offset: o } => mk(true, true, false, false, host(file, o)),
            Mapped::Hole { file, offset: o } => mk(true, false, true, false, host(file, o)),
            Mapped::Zero { host: h } => mk(true, false, true, false, h.and_then(|(f, o)| host(f, o))),
            Mapped::Encoded => mk(true, true, false, true, None),
            Mapped::Unallocated => match &self.backing {
                Some(b) if offset < b.virtual_size() => {
                    let blen = len.min(b.virtual_size() - offset);
                    b.layer_status(offset, blen, depth + 1)?
                }
                // Past the backing image's end, or with no backing: zeroes,
                // reported at the depth of the deepest layer as QEMU does.
                _ => mk(false, false, true, false, None),
            },
        })
    }

    /// The seed's allocation query: whether `start` is allocated in the top
    /// layer, and how many bytes from there (up to `len`) share that answer.
    pub fn check_allocation(&self, start: u64, len: u64) -> Result<(bool, u64)> {
        self.check_open()?;
        if len == 0 {
            return Err(invalid("check_allocation needs a length of at least 1"));
        }
        self.check_range(start, len)?;
        let (status, mut done) = self.top_allocation(start, len)?;
        while done < len {
            let (a, n) = self.top_allocation(start + done, len - done)?;
            if a != status {
                break;
            }
            done += n;
        }
        Ok((status, done))
    }

    /// The whole disk as merged extents, like `qemu-img map`.
    pub fn map(&self) -> Result<Vec<BlockStatus>> {
        self.map_range(0, self.virtual_size())
    }

    pub fn map_range(&self, start: u64, len: u64) -> Result<Vec<BlockStatus>> {
        self.check_open()?;
        self.check_range(start, len)?;
        let mut out: Vec<BlockStatus> = Vec::new();
        let mut pos = start;
        let end = start + len;
        while pos < end {
            let st = self.block_status(pos, end - pos)?;
            pos += st.len;
            if let Some(last) = out.last_mut() {
                if mergeable(last, &st) {
                    last.len += st.len;
                    continue;
                }
            }
            out.push(st);
        }
        Ok(out)
    }

    pub fn info(&self) -> Result<ImageInfo> {
        self.check_open()?;
        if self.snapshot {
            // The opened image as it is on disk, not the overlay.
            return self.user_layer().info();
        }
        let d = self.driver.info()?;
        let b = self.driver.backing();
        let actual_size = self.driver.host_file(0).and_then(|s| s.allocated_bytes());
        Ok(ImageInfo {
            filename: self.location.describe(),
            format: self.format(),
            virtual_size: self.virtual_size(),
            actual_size,
            full_backing_filename: b.as_ref().map(|b| self.location.relative(&b.filename).describe()),
            backing_filename: b.as_ref().map(|b| b.filename.clone()),
            backing_format: b.and_then(|b| b.format),
            encrypted: d.encrypted,
            cluster_size: d.cluster_size,
            dirty: d.dirty,
            format_specific: d.format_specific,
        })
    }
}

/// A folder only we can enter (mkdtemp: mode 0700, a name no one else
/// picked), under the temporary folder (`TMPDIR`); removed with what it
/// holds when dropped.
struct PrivateDir {
    path: std::path::PathBuf,
}

impl PrivateDir {
    fn new(prefix: &str) -> Result<PrivateDir> {
        use std::os::unix::ffi::OsStrExt;
        let tmp = std::env::temp_dir();
        let mut template = tmp.join(format!("{prefix}XXXXXX")).as_os_str().as_bytes().to_vec();
        template.push(0);
        // SAFETY: `template` is a NUL-terminated buffer we own; mkdtemp
        // rewrites its last six characters in place and keeps the length.
        let r = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if r.is_null() {
            return Err(Error::os(
                format!("cannot create a private folder in '{}'", tmp.display()),
                std::io::Error::last_os_error(),
            ));
        }
        template.pop();
        Ok(PrivateDir {
            path: std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&template)),
        })
    }
}

/// An image dropped without `close` (a Python object collected, a panic
/// unwinding) is closed as `close` would: its metadata written back, its
/// locks released. Errors have nowhere to go; `close` reports them.
impl Drop for Image {
    fn drop(&mut self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if !self.read_only {
            let _ = self.driver.close();
        }
        self.release_locks();
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Two adjacent extents print as one in `qemu-img map` when everything but
/// the length agrees and the host offsets continue.
fn mergeable(a: &BlockStatus, b: &BlockStatus) -> bool {
    let flags = a.allocated == b.allocated
        && a.present == b.present
        && a.data == b.data
        && a.zero == b.zero
        && a.compressed == b.compressed
        && a.depth == b.depth;
    let host = match (&a.host, &b.host) {
        (None, None) => true,
        (Some((fa, oa)), Some((fb, ob))) => fa == fb && oa.checked_add(a.len) == Some(*ob),
        _ => false,
    };
    flags && host
}

impl Below for Image {
    fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.virtual_size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if inside > 0 {
            self.read_layer(&mut buf[..inside], offset)?;
        }
        buf[inside..].fill(0);
        Ok(())
    }
    fn has_backing(&self) -> bool {
        true
    }
}
