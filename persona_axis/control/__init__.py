"""Using an axis: the intervention spec, capping configs and calibration, the monitor, sweeps, exports."""
