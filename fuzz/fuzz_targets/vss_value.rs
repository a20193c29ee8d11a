//! VSS signal values as a vehicle agent reads them: JSON replay lines (`replay::parse_line`)
//! and the typed numbers a Kuksa broker delivers, both through `Signal::check`. No panic; an
//! accepted value has its signal's type and range, survives the recorder's `format_line`, and
//! can be applied to the vehicle state the governor reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenfleet_vehicle::signals::{Signal, SignalValue, ValueKind, VehicleState};
use tokenfleet_vehicle::source::replay::{format_line, parse_line};
use tokenfleet_vehicle::Millis;

fn kind_of(v: SignalValue) -> ValueKind {
    match v {
        SignalValue::Bool(_) => ValueKind::Bool,
        SignalValue::Int(_) => ValueKind::Int,
        SignalValue::Float(_) => ValueKind::Float,
        SignalValue::LowVoltage(_) => ValueKind::LowVoltageState,
    }
}

fn accepted(state: &mut VehicleState, signal: Signal, value: SignalValue) {
    assert_eq!(kind_of(value), signal.kind(), "{signal}: {value:?}");
    assert_eq!(
        signal.check(value),
        Ok(value),
        "checking twice changes nothing"
    );
    if let Some(x) = value.as_f64() {
        assert!(x.is_finite());
    }
    let _ = state.apply(tokenfleet_vehicle::signals::SignalUpdate {
        at: Millis(1),
        path: signal,
        value,
    });
}

fn read_all(state: &VehicleState) {
    let now = Millis(2);
    let _ = state.speed_kmh(now);
    let _ = state.is_moving(now);
    let _ = state.selected_gear(now);
    let _ = state.soc_percent(now);
    let _ = state.location(now);
    let _ = state.low_voltage_state(now);
    let _ = state.time_to_complete_s(now);
}

fuzz_target!(|data: &[u8]| {
    let mut state = VehicleState::new();
    // Kuksa: a signal and a raw 64-bit number, as an integer and as a double.
    if let Some((&which, rest)) = data.split_first() {
        if let Some(bits) = rest.get(..8) {
            let bits = u64::from_le_bytes(bits.try_into().expect("8 bytes"));
            let signal = Signal::ALL[which as usize % Signal::ALL.len()];
            for raw in [
                SignalValue::Int(bits as i64),
                SignalValue::Float(f64::from_bits(bits)),
                SignalValue::Float(f64::from(f32::from_bits(bits as u32))),
                SignalValue::Bool(bits & 1 == 1),
            ] {
                if let Ok(v) = signal.check(raw) {
                    accepted(&mut state, signal, v);
                }
            }
        }
    }
    // Replay: every line of the input.
    let Ok(text) = std::str::from_utf8(data) else {
        read_all(&state);
        return;
    };
    for line in text.lines() {
        if let Ok(Some(u)) = parse_line(line) {
            accepted(&mut state, u.path, u.value);
            let again = parse_line(&format_line(&u))
                .expect("a formatted line parses")
                .expect("and is not blank");
            assert_eq!(again.path, u.path);
            // Recorded times are exact to the millisecond (below 2^50 ms, year 37 000; past
            // that an f64 of seconds cannot hold every millisecond).
            if u.at.0 < 1 << 50 {
                assert_eq!(again.at, u.at, "{line}");
            }
            assert_eq!(kind_of(again.value), kind_of(u.value));
        }
    }
    read_all(&state);
});
