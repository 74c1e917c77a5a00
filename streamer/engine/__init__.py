"""The engine: scheduling and running model work on the device, planning queries, answers."""
