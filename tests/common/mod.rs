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
