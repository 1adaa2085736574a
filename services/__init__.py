"""ExeGPT mesh services: the gateway, the worker, the scheduler, batch jobs, how they are run, their
benchmarks, and the command line."""
