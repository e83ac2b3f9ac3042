"""Run bookkeeping: one job from config to status file (`runner`), its directory and crash-safe writes (`rundir`),
metrics sinks, sweeps, warm starts, checkpoint retention and the fault-injection points the tests use."""
