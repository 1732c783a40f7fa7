//! A request record across processes, as nginx workers use it: forked
//! processes record into one record in a shared mapping while the window
//! moves on under them (every slot of the ring is rolled again and again,
//! by whichever process comes first), and some are killed with SIGKILL at
//! arbitrary points, mid-roll included (holding the roll lock, the slot
//! ROLLING). Afterwards:
//!
//! - the total counts every request a process reported done, and at most
//!   one more per killed process (its request in flight);
//! - each window, read while the ring holds it, has every request reported
//!   done in it; at the end, those the ring holds have at most one more per
//!   killed process;
//! - a process never waits for a dead roller: the survivors finish.
//!
//! One test in this file: fork() is only safe with no other test threads
//! running.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

mod common;
use common::{assert_ended, shared_words};

use resty_counter_core::engine::lock::Holder;
use resty_counter_core::engine::requests::{Layout, Recorded, Requests, Roller};

const PROCESSES: usize = 6;
const OPS: u64 = 1_000_000;
const RING: usize = 3;
const WINDOWS: usize = 1 << 16;

/// A process as an nginx worker: its pid, `kill(pid, 0)`.
struct Process;

impl Roller for Process {
    fn me(&self) -> Holder {
        Holder {
            pid: unsafe { libc::getpid() } as u32,
            instance: 1,
        }
    }

    fn alive(&self, pid: u32) -> bool {
        unsafe { libc::kill(pid as i32, 0) == 0 }
    }
}

/// A child's life: OPS requests, each in the window `clock` says now.
/// `done` gets, per window, the requests recorded in it; `total_only` the
/// ones the record put in the total only (the clock moved on meanwhile).
fn child(
    record: &Requests<AtomicU64>,
    clock: &AtomicU64,
    done: &[AtomicU64],
    total_only: &AtomicU64,
) -> ! {
    for i in 0..OPS {
        let window = clock.load(Relaxed);
        match record.record(window, (i % 977) as f64 * 0.37, &Process) {
            Recorded::Window => done[window as usize].fetch_add(1, Relaxed),
            Recorded::TotalOnly => total_only.fetch_add(1, Relaxed),
        };
    }
    unsafe { libc::_exit(0) }
}

#[test]
fn processes_killed_mid_roll_lose_nothing_done() {
    let layout = Layout::new(RING, true).unwrap();
    let cells = shared_words(layout.width() as usize);
    let record = Requests::new(cells, layout).unwrap();
    let clock = &shared_words(1)[0];
    let done: Vec<&[AtomicU64]> = (0..PROCESSES).map(|_| shared_words(WINDOWS)).collect();
    let total_only = shared_words(PROCESSES);

    let mut pids = Vec::new();
    for process in 0..PROCESSES {
        match unsafe { libc::fork() } {
            0 => child(&record, clock, done[process], &total_only[process]),
            pid if pid > 0 => pids.push(pid),
            _ => panic!("fork failed"),
        }
    }

    let progress = |process: usize| -> u64 {
        done[process].iter().map(|d| d.load(Relaxed)).sum::<u64>()
            + total_only[process].load(Relaxed)
    };
    // The clock moves on every 200 us while the children run; every other
    // child is killed at another point of its run (a reaped pid is dead to
    // kill(pid, 0), as nginx's master reaps its workers).
    let mut killed = [false; PROCESSES];
    let mut exited = [false; PROCESSES];
    let mut next_kill = 1;
    let mut last_kill_window = 0;
    let mut sampled = 0;
    let done_in = |window: usize| -> u64 { done.iter().map(|d| d[window].load(Relaxed)).sum() };
    while exited.iter().any(|e| !e) {
        std::thread::sleep(Duration::from_micros(200));
        let now = clock.load(Relaxed);
        assert!((now as usize) < WINDOWS - 1, "the children ran too long");
        clock.store(now + 1, Relaxed);
        // The window before the last one is still in the ring: every
        // request reported done in it is there (read the reports first).
        if now >= 1 {
            let window = now as usize - 1;
            let want = done_in(window);
            if let Some(h) = record.window(window as u64) {
                assert!(
                    h.count >= want,
                    "window {}: {} for {} done",
                    window,
                    h.count,
                    want
                );
                sampled += 1;
            }
        }
        if next_kill < PROCESSES
            && progress(next_kill) >= OPS * next_kill as u64 / (2 * PROCESSES as u64)
        {
            unsafe { libc::kill(pids[next_kill], libc::SIGKILL) };
            killed[next_kill] = true;
            last_kill_window = now;
            next_kill += 2;
        }
        for (process, &pid) in pids.iter().enumerate() {
            let mut status = 0;
            if !exited[process] && unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid
            {
                exited[process] = true;
                assert_ended(process, status, killed[process]);
            }
        }
    }
    let kills = killed.iter().filter(|&&k| k).count() as u64;
    assert_eq!(kills, 3);

    let all_done: u64 = (0..WINDOWS).map(done_in).sum::<u64>()
        + total_only.iter().map(|t| t.load(Relaxed)).sum::<u64>();
    let total = record.total().count;
    assert!(
        total >= all_done && total <= all_done + kills,
        "total {} for {} done",
        total,
        all_done
    );
    let last = clock.load(Relaxed) as usize;
    let mut checked = 0;
    for window in last.saturating_sub(WINDOWS - 1)..=last {
        if let Some(h) = record.window(window as u64) {
            let want = done_in(window);
            assert!(
                h.count >= want && h.count <= want + kills,
                "window {}: {} for {} done",
                window,
                h.count,
                want
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "the ring holds a window");
    // Slots still roll after the kills (a roll lock left by a dead process
    // is taken over): the ring holds a window from after the last kill.
    let newest = (0..=last)
        .rev()
        .find(|&w| record.window(w as u64).map_or(false, |h| h.count > 0))
        .unwrap();
    assert!(
        newest as u64 > last_kill_window,
        "newest window {} from before the last kill ({})",
        newest,
        last_kill_window
    );
    eprintln!(
        "{} requests done, {} in the total only, {} windows ({} checked while \
         in the ring), last kill at {}, newest {}",
        all_done,
        total_only.iter().map(|t| t.load(Relaxed)).sum::<u64>(),
        last,
        sampled,
        last_kill_window,
        newest
    );
    assert!(sampled > 10, "only {} windows checked", sampled);
    // The slots rolled many times over.
    assert!(last > 10 * RING, "only {} windows", last);
    // Windows the ring no longer holds read as absent, whatever was done.
    assert_eq!(record.window(0), None);
}
