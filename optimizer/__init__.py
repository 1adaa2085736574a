"""XProfiler tables, XSimulator and XScheduler: pure planning code (no I/O, torch, clock)."""
