//! What the multi-process tests share.

use std::sync::atomic::AtomicU64;

use resty_counter_core::engine::word::words_at;

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

/// Kills every other child (`pids[1]`, `pids[3]`, ...) with SIGKILL once
/// `progress(process)` reached its point of the run (`ops` the whole run;
/// each at another point, watched together: a fast one must not finish
/// while another is awaited), reaps it at once (a zombie still answers
/// kill(pid, 0)), then reaps the others. Which were killed.
#[allow(dead_code)]
pub fn kill_every_other(pids: &[i32], ops: u64, progress: impl Fn(usize) -> u64) -> Vec<bool> {
    let processes = pids.len();
    let mut killed = vec![false; processes];
    let mut to_kill: Vec<usize> = (0..processes).filter(|p| p % 2 == 1).collect();
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
