//! Deterministic tests of takeover and fencing: a simulated network and paused time.
