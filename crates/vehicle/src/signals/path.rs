//! VSS path constants.

/// Vehicle speed, km/h (float).
pub const SPEED: &str = "Vehicle.Speed";
/// Whether the vehicle is moving (bool).
pub const IS_MOVING: &str = "Vehicle.IsMoving";
/// Selected gear (int8: 126 = Park, 127 = Drive, 0 = Neutral, <0 reverse).
pub const SELECTED_GEAR: &str = "Vehicle.Powertrain.Transmission.SelectedGear";
/// Park lock engaged (bool).
pub const IS_PARK_LOCK_ENGAGED: &str = "Vehicle.Powertrain.Transmission.IsParkLockEngaged";
/// Traction battery state of charge, percent (float).
pub const SOC: &str = "Vehicle.Powertrain.TractionBattery.StateOfCharge.Current";
/// Battery is charging (bool).
pub const IS_CHARGING: &str = "Vehicle.Powertrain.TractionBattery.Charging.IsCharging";
/// Charging cable connected, VSS 5 and later (bool).
pub const IS_CHARGING_CABLE_CONNECTED: &str =
    "Vehicle.Powertrain.TractionBattery.Charging.ChargingPort.AnyPosition.IsChargingCableConnected";
/// Charging cable connected, VSS 4.x spelling (bool).
pub const IS_CHARGING_CABLE_CONNECTED_V4: &str =
    "Vehicle.Powertrain.TractionBattery.Charging.IsChargingCableConnected";
/// Time until charging completes, seconds (uint32).
pub const TIME_TO_COMPLETE: &str = "Vehicle.Powertrain.TractionBattery.Charging.TimeToComplete";
/// Average traction battery temperature, °C (float).
pub const BATTERY_TEMPERATURE: &str = "Vehicle.Powertrain.TractionBattery.Temperature.Average";
/// Power into the traction battery, W; positive while charging, negative while discharging.
pub const BATTERY_CURRENT_POWER: &str = "Vehicle.Powertrain.TractionBattery.CurrentPower";
/// State of the 12 V system (string: UNDEFINED, LOCK, OFF, ACC, ON, START).
pub const LOW_VOLTAGE_SYSTEM_STATE: &str = "Vehicle.LowVoltageSystemState";
/// 12 V battery voltage, V (float).
pub const LOW_VOLTAGE_BATTERY_VOLTAGE: &str = "Vehicle.LowVoltageBattery.CurrentVoltage";
/// Latitude, degrees (double).
pub const LATITUDE: &str = "Vehicle.CurrentLocation.Latitude";
/// Longitude, degrees (double).
pub const LONGITUDE: &str = "Vehicle.CurrentLocation.Longitude";
/// Exterior air temperature, °C (float).
pub const AIR_TEMPERATURE: &str = "Vehicle.Exterior.AirTemperature";
/// Temperature of the central compute unit, °C (VSS 6.0, float).
pub const COMPUTE_TEMPERATURE: &str = "Vehicle.ControlUnit.Central.Health.Resources.Temperature";
/// Power drawn by the central compute unit, W (VSS 6.0, float).
pub const COMPUTE_POWER: &str = "Vehicle.ControlUnit.Central.Health.Resources.Power";
