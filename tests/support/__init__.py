"""What the tests share: servers started and broken on free ports, workloads, checks."""
