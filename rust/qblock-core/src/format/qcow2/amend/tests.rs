//! Crash order of amend: the image is amended on a storage that stops
//! writing after N writes (everything before it durable), for every N up
//! to the whole job. Each state left behind must open, read back the
//! same guest bytes, and count every cluster it references (leaks are
//! allowed, a missing refcount is not); a dirty one is recounted first,
//! as every writable open does.

use super::super::refcount::Refcounts;
use super::super::repair::count_references;
use super::super::tests::{open_bytes, read};
use super::*;
use crate::backend::memory::MemoryStorage;
use crate::options::{CreateOptions, OptValue};
use std::sync::atomic::{AtomicU64, Ordering};

const SIZE: u64 = 4 << 20;

/// A storage whose writes fail once `budget` of them have been made.
struct Crashy {
    inner: MemoryStorage,
    budget: AtomicU64,
}

impl Crashy {
    fn spend(&self) -> Result<()> {
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .map(|_| ())
            .map_err(|_| Error::Internal("crash".into()))
    }
}

impl Storage for Crashy {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.spend()?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.spend()?;
        self.inner.set_len(len)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        "crashy".into()
    }
}

/// A qcow2 image with data, zero clusters (plain and allocated) and
/// holes, made by our own create and write paths; and its guest bytes.
fn image(create: &[(&str, OptValue)]) -> (Vec<u8>, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!(
        "qblock-amend-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let loc = Location::file(dir.join("a.qcow2"));
    let mut o = CreateOptions::new().with("size", OptValue::Int(SIZE));
    for (k, v) in create {
        o = o.with(k, v.clone());
    }
    Image::create(&loc, Format::Qcow2, o).unwrap();
    let img = Image::open(&loc, Some(Format::Qcow2), &OpenOptions::default()).unwrap();
    img.write_at(&[0x11u8; 300_000], 0).unwrap();
    img.write_at(&[0x22u8; 70_000], 1 << 20).unwrap();
    img.write_zeroes(0, 65536).unwrap(); // an allocated cluster, now zero
    img.write_zeroes(2 << 20, 131072).unwrap(); // plain zero clusters
    let mut guest = vec![0u8; SIZE as usize];
    img.read_at(&mut guest, 0).unwrap();
    img.close().unwrap();
    let bytes = std::fs::read(dir.join("a.qcow2")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (bytes, guest)
}

/// What a crash left: opens (recounted first when dirty), reads `guest`,
/// and no referenced cluster lacks a refcount.
fn check_state(bytes: Vec<u8>, guest: &[u8], at: u64) {
    let file = MemoryStorage::new(bytes, false);
    let mut o = read_image(&file).unwrap_or_else(|e| panic!("crash at write {at}: {e}"));
    if o.h.incompatible & INCOMPAT_DIRTY != 0 {
        let order = o.h.refcount_order;
        recount(&file, &mut o.h, order).unwrap();
        o = read_image(&file).unwrap();
    }
    let h = &o.h;
    let refs = count_references(&file, h, h.l1_table_offset, u64::from(h.l1_size)).unwrap();
    let len = file.len().unwrap();
    let mut rc = Refcounts::load(
        &file,
        h.cluster_bits,
        h.refcount_order,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        len,
    )
    .unwrap();
    for (c, &n) in refs.iter().enumerate() {
        let have = rc.get(&file, c as u64).unwrap();
        assert!(
            have >= u64::from(n),
            "crash at write {at}: cluster {c} has {n} references, refcount {have}"
        );
    }
    let d = open_bytes(file.snapshot(), true).unwrap();
    assert_eq!(
        read(&d, 0, guest.len()).unwrap(),
        guest,
        "crash at write {at}: guest bytes differ"
    );
}

/// Amend with a crash at every write in turn; then without one, which
/// must give `want` (version, refcount order).
fn every_crash(create: &[(&str, OptValue)], opts: &AmendOptions, want: (u32, u32)) {
    let (bytes, guest) = image(create);
    let loc = Location::file("/nonexistent/amend-test.qcow2");
    for n in 0.. {
        let file = Crashy {
            inner: MemoryStorage::new(bytes.clone(), false),
            budget: AtomicU64::new(n),
        };
        let r = amend_in(&file, &loc, opts, &mut |_, _| true);
        let after = file.inner.snapshot();
        if r.is_ok() {
            check_state(after.clone(), &guest, n);
            let h = read_image(&MemoryStorage::new(after, false)).unwrap().h;
            assert_eq!((h.version, h.refcount_order), want);
            assert!(n > 2, "the amend made only {n} writes");
            return;
        }
        check_state(after, &guest, n);
    }
}

#[test]
fn refcount_width_change_survives_a_crash_at_every_write() {
    let opts = AmendOptions {
        refcount_bits: Some(1),
        ..Default::default()
    };
    every_crash(&[], &opts, (3, 0));
    let opts = AmendOptions {
        refcount_bits: Some(64),
        ..Default::default()
    };
    every_crash(&[("cluster_size", OptValue::Int(512))], &opts, (3, 6));
}

#[test]
fn downgrade_survives_a_crash_at_every_write() {
    let opts = AmendOptions {
        compat: Some(Compat::V2),
        ..Default::default()
    };
    every_crash(&[], &opts, (2, 4));
    every_crash(&[("lazy_refcounts", OptValue::Bool(true))], &opts, (2, 4));
}

#[test]
fn upgrade_survives_a_crash_at_every_write() {
    let opts = AmendOptions {
        compat: Some(Compat::V3),
        refcount_bits: Some(8),
        ..Default::default()
    };
    every_crash(&[("compat", OptValue::Str("0.10".into()))], &opts, (3, 3));
}

#[test]
fn refusals_write_nothing() {
    let (bytes, _) = image(&[("refcount_bits", OptValue::Int(8))]);
    let loc = Location::file("/nonexistent/amend-test.qcow2");
    for opts in [
        AmendOptions {
            compat: Some(Compat::V2),
            ..Default::default()
        },
        AmendOptions {
            refcount_bits: Some(3),
            ..Default::default()
        },
        AmendOptions {
            backing_file: Some("other".into()),
            ..Default::default()
        },
        AmendOptions {
            compat: Some(Compat::V2),
            lazy_refcounts: Some(true),
            refcount_bits: Some(16),
            ..Default::default()
        },
    ] {
        let file = Crashy {
            inner: MemoryStorage::new(bytes.clone(), false),
            budget: AtomicU64::new(0),
        };
        let e = amend_in(&file, &loc, &opts, &mut |_, _| true).unwrap_err();
        assert_ne!(e.to_string(), "crash", "{opts:?} wrote before refusing");
    }
}

#[test]
fn compat_names() {
    assert_eq!(Compat::parse("0.10").unwrap(), Compat::V2);
    assert_eq!(Compat::parse("v3").unwrap(), Compat::V3);
    assert_eq!(
        Compat::parse("1.0").unwrap_err().to_string(),
        "Unknown compatibility level 1.0"
    );
}
