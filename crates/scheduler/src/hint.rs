//! A cache hint shared by the scheduler's index and the simulator (a million-node fleet does
//! not fit in cache; loading what the next steps will touch hides the misses).

/// Ask the CPU to bring every cache line of `x` into cache. A hint: it changes nothing.
#[inline(always)]
pub fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = (x as *const T).cast::<i8>();
        for off in (0..size_of::<T>()).step_by(64) {
            // SAFETY: a prefetch is a hint that never faults and has no observable effect (the
            // address is inside `x`); SSE is part of the x86_64 baseline.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}
