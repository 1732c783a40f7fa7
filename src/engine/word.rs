//! The one kind of memory the engine touches: 64-bit words, each accessed
//! atomically. A process killed at any instruction leaves every word as it
//! was or as it was written, never torn.
//!
//! The table is generic over [`Word`] so that the very same algorithm runs
//! on `std`'s atomics in production (over memory shared by every nginx
//! worker) and on `loom`'s in the model tests (`loom/`), which try every
//! interleaving.

use std::sync::atomic::{AtomicU64, Ordering};

/// An atomic 64-bit word.
pub trait Word: Send + Sync {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, value: u64, order: Ordering);
    /// As [`AtomicU64::compare_exchange`].
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64>;
    /// Wrapping add; returns the previous value.
    fn fetch_add(&self, value: u64, order: Ordering) -> u64;
}

/// A hint that `value` will be read soon: its cache line is fetched
/// meanwhile (on x86_64 and aarch64; elsewhere nothing). It reads and
/// changes nothing, so it never races: a walk over records thousands of
/// bytes apart (no hardware prefetcher follows such strides) asks for the
/// next ones' lines while it reads this one's.
#[inline]
pub fn prefetch<T>(value: &T) {
    prefetch_ptr(value as *const T);
}

/// [`prefetch`] of an address: any, as a prefetch never faults.
#[inline]
pub fn prefetch_ptr<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch of any address is only a hint: it faults never.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(ptr as *const i8);
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above (`prfm`: prefetch for a load, into L1, kept).
    unsafe {
        std::arch::asm!(
            "prfm pldl1keep, [{0}]",
            in(reg) ptr,
            options(nostack, readonly, preserves_flags)
        );
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = ptr;
}

/// Implements [`Word`] for an atomic type with `std`'s `AtomicU64` methods
/// (`std`'s own here, loom's in the model tests).
#[macro_export]
macro_rules! impl_word {
    ($word:path, $atomic:ty) => {
        impl $word for $atomic {
            #[inline]
            fn load(&self, order: std::sync::atomic::Ordering) -> u64 {
                <$atomic>::load(self, order)
            }

            #[inline]
            fn store(&self, value: u64, order: std::sync::atomic::Ordering) {
                <$atomic>::store(self, value, order)
            }

            #[inline]
            fn compare_exchange(
                &self,
                current: u64,
                new: u64,
                success: std::sync::atomic::Ordering,
                failure: std::sync::atomic::Ordering,
            ) -> Result<u64, u64> {
                <$atomic>::compare_exchange(self, current, new, success, failure)
            }

            #[inline]
            fn fetch_add(&self, value: u64, order: std::sync::atomic::Ordering) -> u64 {
                <$atomic>::fetch_add(self, value, order)
            }
        }
    };
}

impl_word!(Word, AtomicU64);

/// Views raw memory as atomic words.
///
/// # Safety
///
/// `ptr` must be 8-byte aligned and valid for reads and writes of `words`
/// words for `'a`, and every other access to that memory (in this process
/// or another that maps it) must be atomic too.
pub unsafe fn words_at<'a>(ptr: *mut u8, words: usize) -> &'a [AtomicU64] {
    std::slice::from_raw_parts(ptr as *const AtomicU64, words)
}
