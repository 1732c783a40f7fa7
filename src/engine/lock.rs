//! A lock in one shared word that survives its holder's death: the word
//! holds who took it, a worker that finds it held asks whether the holder
//! still exists, and a dead holder's lock is taken over by one
//! compare-and-swap, so exactly one waiter wins it.
//!
//! Who holds it is a process (its pid) and an instance number the process
//! chose at start: when the kernel gives a dead worker's pid to a new one,
//! the new worker sees a holder with its own pid but another instance, and
//! knows that holder is gone.
//!
//! This is a try-lock: nothing here waits. What runs under it (a sync, a
//! flush) must leave shared state such that a takeover at any point is
//! safe: docs/engine.md says how each does.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use super::word::Word;

/// A lock holder: a process and its instance (never both zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub instance: u32,
}

impl Holder {
    fn word(self) -> u64 {
        (u64::from(self.instance) << 32) | u64::from(self.pid)
    }

    fn of(word: u64) -> Holder {
        Holder {
            pid: word as u32,
            instance: (word >> 32) as u32,
        }
    }
}

/// How a lock was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// It was free.
    Free,
    /// Its holder no longer existed; whatever it was doing is left half
    /// done for the new holder to finish.
    FromDead(Holder),
}

/// Tries to take the lock in `word` for `me`. `alive(pid)` tells whether a
/// process exists (`kill(pid, 0)` in nginx).
///
/// # Errors
///
/// The live holder, when the lock is held (by another process, or by `me`
/// already: a second light thread of the same worker must not take it).
pub fn try_lock<W: Word>(
    word: &W,
    me: Holder,
    alive: impl Fn(u32) -> bool,
) -> Result<Taken, Holder> {
    let mine = me.word();
    debug_assert!(mine != 0);
    let mut held = match word.compare_exchange(0, mine, Acquire, Relaxed) {
        Ok(_) => return Ok(Taken::Free),
        Err(held) => held,
    };
    loop {
        let holder = Holder::of(held);
        let dead = if holder.pid == me.pid {
            // Our pid: either us, or a process that had it before us.
            holder.instance != me.instance
        } else {
            !alive(holder.pid)
        };
        if held == mine || !dead {
            return Err(holder);
        }
        match word.compare_exchange(held, mine, Acquire, Relaxed) {
            Ok(_) => return Ok(Taken::FromDead(holder)),
            // Released, or taken over by another waiter: look again.
            Err(0) => match word.compare_exchange(0, mine, Acquire, Relaxed) {
                Ok(_) => return Ok(Taken::Free),
                Err(now) => held = now,
            },
            Err(now) => held = now,
        }
    }
}

/// Releases the lock if `me` holds it; false when it was not ours (it was
/// taken over: we were thought dead, which a live process never is unless
/// the pid check lied).
pub fn unlock<W: Word>(word: &W, me: Holder) -> bool {
    word.compare_exchange(me.word(), 0, Release, Relaxed)
        .is_ok()
}

/// Who holds the lock, if anyone.
pub fn holder<W: Word>(word: &W) -> Option<Holder> {
    match word.load(Relaxed) {
        0 => None,
        held => Some(Holder::of(held)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    const A: Holder = Holder {
        pid: 100,
        instance: 1,
    };
    const B: Holder = Holder {
        pid: 200,
        instance: 7,
    };

    #[test]
    fn a_free_lock_is_taken_and_released() {
        let word = AtomicU64::new(0);
        assert_eq!(try_lock(&word, A, |_| true), Ok(Taken::Free));
        assert_eq!(holder(&word), Some(A));
        assert_eq!(try_lock(&word, B, |_| true), Err(A));
        assert!(!unlock(&word, B));
        assert!(unlock(&word, A));
        assert_eq!(holder(&word), None);
        assert_eq!(try_lock(&word, B, |_| true), Ok(Taken::Free));
    }

    #[test]
    fn the_holder_itself_cannot_take_it_twice() {
        let word = AtomicU64::new(0);
        try_lock(&word, A, |_| true).unwrap();
        assert_eq!(try_lock(&word, A, |_| false), Err(A));
    }

    #[test]
    fn a_dead_holder_is_taken_over() {
        let word = AtomicU64::new(0);
        try_lock(&word, A, |_| true).unwrap();
        assert_eq!(
            try_lock(&word, B, |pid| pid != A.pid),
            Ok(Taken::FromDead(A))
        );
        assert_eq!(holder(&word), Some(B));
        // The dead holder's late unlock (it was not dead after all) fails.
        assert!(!unlock(&word, A));
    }

    #[test]
    fn a_reused_pid_is_a_new_process() {
        let word = AtomicU64::new(0);
        try_lock(&word, A, |_| true).unwrap();
        let reborn = Holder {
            pid: A.pid,
            instance: A.instance + 1,
        };
        assert_eq!(try_lock(&word, reborn, |_| true), Ok(Taken::FromDead(A)));
    }
}
