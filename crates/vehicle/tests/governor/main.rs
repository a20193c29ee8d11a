//! Table-driven tests of every governor transition, plus the noisy-SoC regression
//! (BOINC issue #5815 is the anti-example: on/off flapping around a threshold).

mod noisy_soc;
mod start;
mod stop;
mod support;
mod throttle;
