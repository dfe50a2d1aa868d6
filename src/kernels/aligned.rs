//! A zeroed byte buffer on 64-byte cache lines, for weights repacked into tiles.

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// `len` bytes (a multiple of 64), each cache line starting on a 64-byte boundary.
pub struct AlignedBytes(Vec<Line>);

impl AlignedBytes {
    pub fn zeroed(len: usize) -> Self {
        assert!(len.is_multiple_of(64), "whole cache lines");
        Self(vec![Line([0; 64]); len / 64])
    }

    pub fn as_slice(&self) -> &[u8] {
        // Safety: `Line` is 64 plain bytes with no padding.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.0.len() * 64) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // Safety: as `as_slice`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, self.0.len() * 64) }
    }
}
