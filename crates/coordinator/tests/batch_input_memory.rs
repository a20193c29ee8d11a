//! Issue 13, hole 13: parsing a batch input holds one copy of a line's JSON, not two. A
//! counting allocator (this test binary's only) records the peak of live heap bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokenfleet_coordinator::batch::input::parse_input;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::SeqCst) + n;
    PEAK.fetch_max(live, Ordering::SeqCst);
}

// SAFETY: every call forwards to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: our caller upholds `alloc`'s contract for `layout`; it passes through as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` above, i.e. from `System`, with this `layout`
        // (our caller's contract), so it is `System`'s to free.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, `ptr` and `layout` are `System`'s, and our caller upholds
        // `realloc`'s contract for `new_size`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn parsing_a_large_line_holds_one_copy_of_its_json() {
    let prompt = "x".repeat(16 << 20);
    let line =
        serde_json::json!({"custom_id": "big", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": prompt}]}})
        .to_string();
    drop(prompt);
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let lines = parse_input(line.as_bytes(), 10).unwrap();
    let extra = PEAK.load(Ordering::SeqCst) - before;
    assert_eq!(lines.len(), 1);
    // The parsed tree holds the 16 MiB prompt once (plus small change); a copy of the body,
    // as before, makes it twice.
    assert!(
        extra < line.len() * 3 / 2,
        "parsing a {} byte line peaked at {extra} more bytes",
        line.len()
    );
}
