//! Memory behind the receive and send rings of the TCP sockets.
//!
//! smoltcp owns a socket's two rings for the socket's whole life and cannot
//! give them back while the connection is open. An idle kernel socket holds
//! no buffer memory; an idle smoltcp socket holds every page its rings have
//! ever touched, and a ring that empties starts again at offset 0, so even a
//! connection that carried one request keeps a page per ring resident.
//!
//! So the rings live in slots of anonymous mappings that the node owns:
//! page-aligned, nothing else on their pages. When a connection is parked
//! with nothing queued, the pages of its send ring go back to the kernel
//! (`MADV_DONTNEED`: the next write finds a fresh zero page), and a slot
//! freed by a closed connection is handed back whole before it is reused.
//! Slots are reused last-freed first; a region is never unmapped before the
//! node is dropped.
//!
//! This is the only unsafe code in the crate: mapping and unmapping the
//! regions, handing out a slot's two rings as `&'static mut [u8]`, and
//! `madvise`. The invariants that make it sound are written where they are
//! relied on: a slot is handed out again only after the socket that held it
//! was dropped (the [`Slot`] token is not `Clone` and is consumed by
//! [`SocketBuffers::recycle`]), and every socket is dropped before the
//! regions are (`Node`'s `Drop`).
#![allow(unsafe_code)]

use std::io;
use std::ptr::NonNull;

/// Slots per mapping: with 256 KiB rings, 32 MiB of address space per
/// `mmap`, so that 10,000 connections cost 157 mappings (well under the
/// kernel's `vm.max_map_count` of 65,530), not two per connection.
const SLOTS_PER_REGION: usize = 64;

/// One connection's rings, carved from a slot.
pub(crate) struct Rings {
    pub rx: &'static mut [u8],
    pub tx: &'static mut [u8],
}

/// The right to one slot's memory. Whoever holds it holds the socket that
/// uses the slot's rings; it goes back through [`SocketBuffers::recycle`]
/// once that socket is dropped.
#[derive(Debug)]
pub(crate) struct Slot(usize);

struct Region {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a region is plain memory owned by the pool; it is reached only
// through the slices handed out for its slots, which Rust's borrow rules
// govern like any other `&mut [u8]`.
unsafe impl Send for Region {}

impl Region {
    fn map(len: usize) -> io::Result<Region> {
        #[cfg(target_os = "linux")]
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        #[cfg(not(target_os = "linux"))]
        let flags = libc::MAP_PRIVATE | libc::MAP_ANON;
        // SAFETY: a new private anonymous mapping at an address the kernel
        // picks touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave 0"))?;
        Ok(Region { base, len })
    }

    fn contains(&self, bytes: &[u8]) -> bool {
        let start = self.base.as_ptr() as usize;
        let at = bytes.as_ptr() as usize;
        at >= start && at + bytes.len() <= start + self.len
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and no slice into it outlives the
        // pool (see the module's invariants).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// The pool of ring slots of one node.
pub(crate) struct SocketBuffers {
    ring: usize,
    page: usize,
    regions: Vec<Region>,
    /// Slots handed back, the most recently freed last.
    free: Vec<usize>,
    /// Slots ever carved: every index below it is in use or in `free`.
    carved: usize,
}

impl SocketBuffers {
    /// A pool of slots holding two rings of `ring` bytes each (a multiple
    /// of the page size).
    pub(crate) fn new(ring: usize) -> SocketBuffers {
        let page = page_size();
        assert!(
            ring > 0 && ring.is_multiple_of(page),
            "TCP ring of {ring} bytes is not a whole number of {page}-byte pages"
        );
        SocketBuffers {
            ring,
            page,
            regions: Vec::new(),
            free: Vec::new(),
            carved: 0,
        }
    }

    fn slot_len(&self) -> usize {
        2 * self.ring
    }

    /// Slots in use (handed out and not recycled).
    pub(crate) fn in_use(&self) -> usize {
        self.carved - self.free.len()
    }

    /// Bytes of ring memory resident now, as the kernel counts them: what
    /// the connections' buffers cost, unlike the address space mapped.
    pub(crate) fn resident(&self) -> usize {
        self.regions
            .iter()
            .map(|r| resident_pages(r.base.as_ptr(), r.len, self.page) * self.page)
            .sum()
    }

    /// Two rings for a new socket, and the token that frees them.
    pub(crate) fn take(&mut self) -> io::Result<(Slot, Rings)> {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                if self.carved == self.regions.len() * SLOTS_PER_REGION {
                    self.regions
                        .push(Region::map(SLOTS_PER_REGION * self.slot_len())?);
                }
                self.carved += 1;
                self.carved - 1
            }
        };
        let region = &self.regions[index / SLOTS_PER_REGION];
        let offset = (index % SLOTS_PER_REGION) * self.slot_len();
        // SAFETY: the slot lies inside a live mapping of ours, and no other
        // slice covers it: it was never handed out, or the socket holding
        // its previous rings was dropped before its token came back
        // (`recycle`). The regions outlive every socket (`Node`'s `Drop`),
        // which is what the `'static` stands for.
        let rings = unsafe {
            let rx = region.base.as_ptr().add(offset);
            Rings {
                rx: std::slice::from_raw_parts_mut(rx, self.ring),
                tx: std::slice::from_raw_parts_mut(rx.add(self.ring), self.ring),
            }
        };
        Ok((Slot(index), rings))
    }

    /// Take a slot back once the socket that held its rings is dropped: its
    /// pages go back to the kernel, and the slot is reused first.
    pub(crate) fn recycle(&mut self, slot: Slot) {
        let region = &self.regions[slot.0 / SLOTS_PER_REGION];
        let offset = (slot.0 % SLOTS_PER_REGION) * self.slot_len();
        // SAFETY: the range is one slot inside our mapping, and no slice
        // covers it any more (the token's holder dropped its socket).
        unsafe {
            libc::madvise(
                region.base.as_ptr().add(offset).cast(),
                self.slot_len(),
                libc::MADV_DONTNEED,
            );
        }
        self.free.push(slot.0);
    }

    /// Give the whole pages inside `bytes`, the free space of a ring, back
    /// to the kernel; they read as zeros when touched again. Does nothing
    /// to memory that is not one of our slots.
    pub(crate) fn discard(&self, bytes: &mut [u8]) {
        if !self.regions.iter().any(|r| r.contains(bytes)) {
            return;
        }
        let start = bytes.as_ptr() as usize;
        let first = start.next_multiple_of(self.page);
        let end = (start + bytes.len()) / self.page * self.page;
        if end <= first {
            return;
        }
        // SAFETY: `[first, end)` lies inside `bytes`, which we borrow
        // mutably, in a private anonymous mapping: discarding its pages is
        // writing zeros there.
        unsafe {
            libc::madvise(
                bytes.as_mut_ptr().add(first - start).cast(),
                end - first,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// Resident pages of `len` bytes at `start` (mincore); 0 if the kernel
/// will not say.
fn resident_pages(start: *mut u8, len: usize, page: usize) -> usize {
    let mut pages = vec![0u8; len.div_ceil(page)];
    // SAFETY: mincore only reads the page tables of the range and writes
    // one byte per page into `pages`, which is long enough.
    let rc = unsafe { libc::mincore(start.cast(), len, pages.as_mut_ptr().cast()) };
    if rc != 0 {
        return 0;
    }
    pages.iter().filter(|v| **v & 1 == 1).count()
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident(bytes: &[u8], page: usize) -> usize {
        resident_pages(bytes.as_ptr().cast_mut(), bytes.len(), page)
    }

    #[test]
    fn slots_are_disjoint_page_aligned_and_reused_last_freed_first() {
        let page = page_size();
        let mut pool = SocketBuffers::new(64 * page);
        let mut taken = Vec::new();
        for _ in 0..SLOTS_PER_REGION + 3 {
            taken.push(pool.take().unwrap());
        }
        assert_eq!(pool.regions.len(), 2);
        assert_eq!(pool.in_use(), SLOTS_PER_REGION + 3);
        let mut starts: Vec<usize> = Vec::new();
        for (_, rings) in &taken {
            assert_eq!(rings.rx.as_ptr() as usize % page, 0);
            assert_eq!(
                rings.tx.as_ptr() as usize,
                rings.rx.as_ptr() as usize + 64 * page
            );
            starts.push(rings.rx.as_ptr() as usize);
        }
        starts.sort();
        starts.dedup();
        assert_eq!(starts.len(), taken.len(), "two slots share memory");

        let (slot, rings) = taken.remove(5);
        let freed = rings.rx.as_ptr() as usize;
        pool.recycle(slot);
        assert_eq!(pool.in_use(), SLOTS_PER_REGION + 2);
        let (_, again) = pool.take().unwrap();
        assert_eq!(again.rx.as_ptr() as usize, freed);
    }

    #[test]
    fn discarded_and_recycled_pages_leave_memory_and_read_as_zero() {
        let page = page_size();
        let mut pool = SocketBuffers::new(16 * page);
        let (slot, rings) = pool.take().unwrap();
        assert_eq!(
            resident(rings.tx, page),
            0,
            "untouched rings are not resident"
        );
        rings.tx[..3 * page].fill(7);
        rings.rx[0] = 1;
        assert_eq!(resident(rings.tx, page), 3);
        pool.discard(&mut rings.tx[..]);
        assert_eq!(resident(rings.tx, page), 0);
        assert!(rings.tx.iter().all(|b| *b == 0));
        // A slice that does not start on a page keeps its partial page.
        rings.tx[..2 * page].fill(9);
        pool.discard(&mut rings.tx[1..]);
        assert_eq!(resident(rings.tx, page), 1);
        assert_eq!(rings.tx[page], 0);
        assert_eq!(rings.tx[0], 9);

        // Memory that is not ours is left alone.
        let mut other = vec![5u8; 4 * page];
        pool.discard(&mut other);
        assert!(other.iter().all(|b| *b == 5));

        let rx = rings.rx.as_ptr() as usize;
        pool.recycle(slot);
        let (_, rings) = pool.take().unwrap();
        assert_eq!(rings.rx.as_ptr() as usize, rx);
        assert_eq!(resident(rings.rx, page) + resident(rings.tx, page), 0);
        assert_eq!(rings.rx[0], 0);
    }
}
