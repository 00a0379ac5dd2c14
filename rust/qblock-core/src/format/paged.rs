//! A table of 64-bit entries read from a file into pages of [`PAGE`]
//! entries (1 MiB each), so that no single allocation grows with a size the
//! file declares (a 64 TiB VHDX with 1 MiB blocks has a 512 MiB BAT; a
//! cloop offset table may be 512 MiB). The total stays bounded by the
//! table's bytes in the file and each format's cap on them.

use crate::backend::Storage;
use crate::error::{try_zeroed, Error, Result};

/// Entries per page: 1 MiB of u64s.
pub const PAGE: usize = 1 << 17;

pub struct Paged<T> {
    pages: Vec<Box<[T]>>,
    len: usize,
}

/// Byte order of the entries on disk.
#[derive(Clone, Copy)]
pub enum Order {
    Big,
    Little,
}

impl<T> Paged<T> {
    /// Read `count` entries at `offset`, mapping each with `f`.
    pub fn read(
        storage: &dyn Storage,
        offset: u64,
        count: usize,
        order: Order,
        what: &str,
        f: impl Fn(u64) -> T,
    ) -> Result<Paged<T>> {
        let oom = || Error::NoMemory(format!("cannot allocate {count} entries for {what}"));
        let mut pages = Vec::new();
        pages.try_reserve_exact(count.div_ceil(PAGE)).map_err(|_| oom())?;
        let mut bytes = try_zeroed(count.min(PAGE) * 8, what)?;
        let mut done = 0usize;
        while done < count {
            let n = (count - done).min(PAGE);
            storage.read_at(&mut bytes[..n * 8], offset + done as u64 * 8)?;
            let mut page = Vec::new();
            page.try_reserve_exact(n).map_err(|_| oom())?;
            page.extend(bytes[..n * 8].chunks_exact(8).map(|c| {
                let a: [u8; 8] = c.try_into().unwrap_or_default();
                f(match order {
                    Order::Big => u64::from_be_bytes(a),
                    Order::Little => u64::from_le_bytes(a),
                })
            }));
            pages.push(page.into_boxed_slice());
            done += n;
        }
        Ok(Paged { pages, len: count })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entry `i`; panics past the end, like a slice (callers index within
    /// the geometry they checked at open).
    pub fn get(&self, i: usize) -> &T {
        &self.pages[i / PAGE][i % PAGE]
    }
}

impl<T> std::ops::Index<usize> for Paged<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        self.get(i)
    }
}

/// Read `count` 64-bit entries at `offset` into one vector, 1 MiB of file
/// at a time: the table is held once, never also as raw bytes.
pub fn read_u64s(storage: &dyn Storage, offset: u64, count: usize, order: Order, what: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    out.try_reserve_exact(count)
        .map_err(|_| Error::NoMemory(format!("cannot allocate {count} entries for {what}")))?;
    let mut bytes = try_zeroed(count.min(PAGE) * 8, what)?;
    while out.len() < count {
        let n = (count - out.len()).min(PAGE);
        storage.read_at(&mut bytes[..n * 8], offset + out.len() as u64 * 8)?;
        out.extend(bytes[..n * 8].chunks_exact(8).map(|c| {
            let a: [u8; 8] = c.try_into().unwrap_or_default();
            match order {
                Order::Big => u64::from_be_bytes(a),
                Order::Little => u64::from_le_bytes(a),
            }
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStorage;

    #[test]
    fn entries_cross_pages() {
        let count = PAGE + 3;
        let mut b = vec![0u8; 16];
        for i in 0..count as u64 {
            b.extend_from_slice(&(i * 3).to_be_bytes());
        }
        let s = MemoryStorage::new(b, true);
        let t = Paged::read(&s, 16, count, Order::Big, "a test table", |v| v).unwrap();
        assert_eq!(t.len(), count);
        assert_eq!(*t.get(0), 0);
        assert_eq!(*t.get(PAGE - 1), (PAGE as u64 - 1) * 3);
        assert_eq!(*t.get(PAGE + 2), (PAGE as u64 + 2) * 3);
        let v = read_u64s(&s, 16, count, Order::Big, "a test table").unwrap();
        assert_eq!(v.len(), count);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));
    }
}
