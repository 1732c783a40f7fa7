//! What the multi-process tests share.

use std::sync::atomic::AtomicU64;

use resty_counter_core::engine::lock::Holder;
use resty_counter_core::engine::table::{Owner, Record, Table};
use resty_counter_core::engine::word::words_at;
use resty_counter_core::engine::Error;

/// `words` zeroed words in an anonymous shared mapping: what a fork()ed
/// child writes, its parent and siblings see, as nginx's workers see a
/// zone.
pub fn shared_words(words: usize) -> &'static [AtomicU64] {
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            words * 8,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(at, libc::MAP_FAILED, "mmap");
        words_at(at as *mut u8, words)
    }
}

/// Checks how a child process ended: killed by its signal when `killed`,
/// else exited with 0.
pub fn assert_ended(process: usize, status: i32, killed: bool) {
    if killed {
        assert!(
            libc::WIFSIGNALED(status),
            "process {} ended before its kill",
            process
        );
    } else {
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "process {} failed: {}",
            process,
            status
        );
    }
}

/// Whether `kill_every_other` kills child `process` (every other one).
#[allow(dead_code)]
pub fn killed_mid_run(process: usize) -> bool {
    process % 2 == 1
}

/// Kills every other child (`pids[1]`, `pids[3]`, ...: `killed_mid_run`)
/// with SIGKILL once `progress(process)` reached its point of the run
/// (`ops` the whole run; each at another point, watched together: a fast
/// one must not finish while another is awaited), reaps it at once (a
/// zombie still answers kill(pid, 0)), then reaps the others. Which were
/// killed. On a busy machine this process may be descheduled for longer
/// than a child's whole run: a child that must end killed should run
/// until it is (see tests/shared_limit.rs), else it may end first.
#[allow(dead_code)]
pub fn kill_every_other(pids: &[i32], ops: u64, progress: impl Fn(usize) -> u64) -> Vec<bool> {
    let processes = pids.len();
    let mut killed = vec![false; processes];
    let mut to_kill: Vec<usize> = (0..processes).filter(|&p| killed_mid_run(p)).collect();
    while !to_kill.is_empty() {
        to_kill.retain(|&process| {
            let at = ops * process as u64 / (2 * processes as u64);
            if progress(process) < at {
                return true;
            }
            let pid = pids[process];
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut status = 0;
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert_ended(process, status, true);
            killed[process] = true;
            false
        });
        std::hint::spin_loop();
    }
    for (process, &pid) in pids.iter().enumerate() {
        if !killed[process] {
            let mut status = 0;
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert_ended(process, status, false);
        }
    }
    killed
}

/// This process as an nginx worker: its pid and `kill(pid, 0)`; with
/// `ms_clock`, on a clock whose "seconds" are milliseconds (the 10 s grace
/// period lasts 10 ms: removed records come back soon), else on the real
/// one.
#[allow(dead_code)]
pub struct Worker {
    pub ms_clock: bool,
}

impl Owner for Worker {
    fn me(&self) -> Holder {
        Holder {
            pid: std::process::id(),
            instance: 1,
        }
    }

    fn alive(&self, pid: u32) -> bool {
        unsafe { libc::kill(pid as i32, 0) == 0 }
    }

    fn now(&self) -> u64 {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if !self.ms_clock {
            unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
            return now.tv_sec as u64;
        }
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
    }
}

/// The record of `key` for `worker`, waiting out a busy table lock (a
/// holder descheduled among several processes on two cores); a child that
/// finds no room exits with 3.
#[allow(dead_code)]
pub fn record_of<'a>(
    table: &Table<'a, AtomicU64>,
    key: &[u8],
    width: u32,
    worker: &Worker,
) -> Record<'a, AtomicU64> {
    loop {
        match table.get_or_insert_by(key, width, worker) {
            Ok((record, _)) => return record,
            Err(Error::Busy) => continue,
            Err(_) => unsafe { libc::_exit(3) },
        }
    }
}
