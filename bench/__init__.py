"""minifs's benchmark lab: workloads, probes, runner and report (`minifs bench`)."""
