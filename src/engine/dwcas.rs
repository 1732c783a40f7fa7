//! The hardware's 16-byte compare-and-swap, by inline assembly (rustc
//! 1.63 has no `AtomicU128`), on the two targets that have one:
//!
//! - x86_64: `lock cmpxchg16b` (every x86_64 CPU since 2006; checked at
//!   run time all the same);
//! - aarch64: `caspal` where the CPU has LSE (ARMv8.1, detected once at
//!   run time: Graviton 2 and later, Ampere Altra, Apple M1 and later), else
//!   an `ldaxp`/`stlxp` loop (ARMv8.0: every aarch64 CPU).
//!
//! Both are sequentially consistent read-modify-writes: the lock prefix is
//! a full barrier; `caspal` and the `ldaxp`/`stlxp` pair are acquire and
//! release at once, which is what LLVM emits for a 16-byte SeqCst
//! compare-and-swap on aarch64 (ARMv8's acquire and release accesses are
//! ordered among themselves, RCsc: a release store is never passed by a
//! later acquire load). docs/engine.md, "The pair", says what the callers
//! rely on.
//!
//! On every other target [`supported`] is false: the FFI refuses strict and
//! limit records before any pair is touched.

/// Whether this CPU has a 16-byte compare-and-swap.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("cmpxchg16b")
    }
    #[cfg(target_arch = "aarch64")]
    {
        // The ldaxp/stlxp loop is ARMv8.0.
        true
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Replaces the 16 bytes at `dst` by `new` when they hold `current`, in
/// one atomic step (SeqCst); else returns what they hold (read whole).
///
/// # Safety
///
/// `dst` is 16-byte aligned, valid for reads and writes, and only
/// accessed atomically; [`supported`] is true.
#[inline]
pub unsafe fn compare_exchange(
    dst: *mut u64,
    current: [u64; 2],
    new: [u64; 2],
) -> Result<(), [u64; 2]> {
    let seen = hardware(dst, current, new);
    if seen == current {
        Ok(())
    } else {
        Err(seen)
    }
}

/// The instruction: what the 16 bytes held (swapped when `current`).
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn hardware(dst: *mut u64, current: [u64; 2], new: [u64; 2]) -> [u64; 2] {
    cmpxchg16b(dst, current, new)
}

#[cfg(target_arch = "aarch64")]
#[inline]
unsafe fn hardware(dst: *mut u64, current: [u64; 2], new: [u64; 2]) -> [u64; 2] {
    if has_lse() {
        caspal(dst, current, new)
    } else {
        ldaxp_stlxp(dst, current, new)
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn hardware(_: *mut u64, _: [u64; 2], _: [u64; 2]) -> [u64; 2] {
    unreachable!("no 16-byte compare-and-swap on this target")
}

#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn cmpxchg16b(dst: *mut u64, current: [u64; 2], new: [u64; 2]) -> [u64; 2] {
    let (low, high): (u64, u64);
    // rbx may be LLVM's: the new low word goes in through rdi, is swapped
    // into rbx and rbx is restored after. Registers are named, so that no
    // operand lands in rbx. The instruction leaves the pair it found in
    // rdx:rax: it equals `current` exactly when it swapped.
    std::arch::asm!(
        "xchg rdi, rbx",
        "lock cmpxchg16b xmmword ptr [rsi]",
        "mov rbx, rdi",
        in("rsi") dst,
        inout("rdi") new[0] => _,
        in("rcx") new[1],
        inout("rax") current[0] => low,
        inout("rdx") current[1] => high,
        options(nostack),
    );
    [low, high]
}

/// Whether the CPU has LSE (`casp`), asked of the OS once: 0 not yet
/// known, 1 no, 2 yes. Relaxed: every thread computes the same answer.
#[cfg(target_arch = "aarch64")]
static LSE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether this CPU has `casp` (FEAT_LSE).
#[cfg(target_arch = "aarch64")]
#[inline]
pub fn has_lse() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match LSE.load(Relaxed) {
        0 => {
            let lse = std::arch::is_aarch64_feature_detected!("lse");
            LSE.store(if lse { 2 } else { 1 }, Relaxed);
            lse
        }
        known => known == 2,
    }
}

/// `caspal`: compares the pair at `dst` with x6:x7 (each register pair
/// must be an even and odd one) and writes x4:x5 when equal; x6:x7 get
/// what it found, read whole either way. Acquire and release.
///
/// # Safety
///
/// As [`compare_exchange`], and the CPU has LSE ([`has_lse`]).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "lse")]
#[inline]
pub(crate) unsafe fn caspal(dst: *mut u64, current: [u64; 2], new: [u64; 2]) -> [u64; 2] {
    let (low, high): (u64, u64);
    std::arch::asm!(
        "caspal x6, x7, x4, x5, [{dst}]",
        dst = in(reg) dst,
        inout("x6") current[0] => low,
        inout("x7") current[1] => high,
        in("x4") new[0],
        in("x5") new[1],
        options(nostack, preserves_flags),
    );
    [low, high]
}

/// The ARMv8.0 loop: `ldaxp` reads the pair and marks it exclusive;
/// `stlxp` writes it only if nobody wrote it since, else the loop reads
/// again. A load-exclusive pair alone may be torn: only a store-exclusive
/// that succeeds makes the read whole, so a comparison that fails stores
/// back what it read (and reads again if that store fails) before it
/// returns it. Acquire (`ldaxp`) and release (`stlxp`), in one asm block:
/// no compiler-placed access between them can clear the reservation.
///
/// # Safety
///
/// As [`compare_exchange`].
#[cfg(target_arch = "aarch64")]
#[inline]
pub(crate) unsafe fn ldaxp_stlxp(dst: *mut u64, current: [u64; 2], new: [u64; 2]) -> [u64; 2] {
    let (low, high): (u64, u64);
    std::arch::asm!(
        "2:",
        "ldaxp {low}, {high}, [{dst}]",
        "cmp {low}, {current_low}",
        "ccmp {high}, {current_high}, #0, eq",
        "b.ne 3f",
        "stlxp {failed:w}, {new_low}, {new_high}, [{dst}]",
        "cbnz {failed:w}, 2b",
        "b 4f",
        "3:",
        "stlxp {failed:w}, {low}, {high}, [{dst}]",
        "cbnz {failed:w}, 2b",
        "4:",
        dst = in(reg) dst,
        current_low = in(reg) current[0],
        current_high = in(reg) current[1],
        new_low = in(reg) new[0],
        new_high = in(reg) new[1],
        low = out(reg) low,
        high = out(reg) high,
        failed = out(reg) _,
        options(nostack),
    );
    [low, high]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::Acquire};

    /// Each implementation this CPU can run, by name.
    type Cas = unsafe fn(*mut u64, [u64; 2], [u64; 2]) -> [u64; 2];

    fn implementations() -> Vec<(&'static str, Cas)> {
        #[cfg(target_arch = "x86_64")]
        let found: Vec<(&'static str, Cas)> = vec![("cmpxchg16b", cmpxchg16b)];
        #[cfg(target_arch = "aarch64")]
        let found = {
            let mut found: Vec<(&'static str, Cas)> = vec![("ldaxp/stlxp", ldaxp_stlxp)];
            if has_lse() {
                found.push(("caspal", caspal));
            }
            found
        };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let found = Vec::new();
        found
    }

    #[repr(C, align(16))]
    struct Pair([AtomicU64; 2]);

    impl Pair {
        fn ptr(&self) -> *mut u64 {
            self.0.as_ptr() as *mut u64
        }
    }

    #[test]
    fn each_implementation_swaps_both_words_or_none() {
        assert!(supported());
        for (name, cas) in implementations() {
            let pair = Pair([AtomicU64::new(1), AtomicU64::new(2)]);
            unsafe {
                assert_eq!(cas(pair.ptr(), [1, 2], [3, 4]), [1, 2], "{}", name);
                assert_eq!(cas(pair.ptr(), [1, 4], [5, 6]), [3, 4], "{}", name);
                assert_eq!(cas(pair.ptr(), [3, 2], [5, 6]), [3, 4], "{}", name);
                assert_eq!(cas(pair.ptr(), [3, 4], [u64::MAX, 0]), [3, 4], "{}", name);
            }
            assert_eq!(pair.0[0].load(Acquire), u64::MAX, "{}", name);
            assert_eq!(pair.0[1].load(Acquire), 0, "{}", name);
        }
    }

    /// RC_EXPECT_LSE=0 or 1 (make aarch64-test sets it from the emulated
    /// CPU): the detection sees what the CPU has, so that the run on a CPU
    /// without LSE is known to take the ldaxp/stlxp path.
    #[test]
    fn the_detected_path_is_the_cpus() {
        let expected = match std::env::var("RC_EXPECT_LSE") {
            Ok(value) => value == "1",
            Err(_) => return,
        };
        #[cfg(target_arch = "aarch64")]
        assert_eq!(has_lse(), expected);
        #[cfg(not(target_arch = "aarch64"))]
        assert!(!expected, "LSE is aarch64's");
    }

    /// Threads add to one pair by compare-and-swap from what they read:
    /// `[n, 2n]` always. A lost update leaves a total short; a torn read
    /// that the compare-and-swap took for whole shows as a pair off the
    /// line, or as a swap from a pair that never was. The threads start
    /// together and must have met (a failed swap somewhere), or the test
    /// showed nothing.
    #[test]
    fn threads_adding_by_compare_and_swap_lose_nothing() {
        const THREADS: u64 = 8;
        const ADDS: u64 = 100_000;
        // Rounds at most until the threads meet: on a loaded machine a
        // round's threads may each run its adds in one time slice.
        const ROUNDS: u32 = 50;
        for (name, cas) in implementations() {
            let mut met = false;
            for _ in 0..ROUNDS {
                met = adders_meet(name, cas, THREADS, ADDS);
                if met {
                    break;
                }
            }
            assert!(met, "{}: the threads never met in {} rounds", name, ROUNDS);
        }
    }

    /// One round of `threads` threads each adding [1, 2] `adds` times by
    /// `cas` to a pair from [0, 0]: whether any swap failed (the threads
    /// met). The pair ends at exactly the sum.
    fn adders_meet(name: &str, cas: Cas, threads: u64, adds: u64) -> bool {
        let pair = Pair([AtomicU64::new(0), AtomicU64::new(0)]);
        let start = std::sync::Barrier::new(threads as usize);
        let retries = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        let mut seen = [pair.0[0].load(Acquire), pair.0[1].load(Acquire)];
                        let mut retries = 0u64;
                        for _ in 0..adds {
                            loop {
                                let new = [seen[0] + 1, seen[1] + 2];
                                let found = unsafe { cas(pair.ptr(), seen, new) };
                                if found == seen {
                                    seen = new;
                                    break;
                                }
                                assert_eq!(found[1], 2 * found[0], "{}: torn {:?}", name, found);
                                seen = found;
                                retries += 1;
                            }
                        }
                        retries
                    })
                })
                .collect();
            handles.into_iter().map(|t| t.join().unwrap()).sum::<u64>()
        });
        let total = [pair.0[0].load(Acquire), pair.0[1].load(Acquire)];
        assert_eq!(total, [threads * adds, 2 * threads * adds], "{}", name);
        retries > 0
    }
}
