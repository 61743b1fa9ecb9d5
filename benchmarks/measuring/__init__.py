"""What the measuring commands (``speed``, ``scale_speed``) share: memory probes, timers and inputs."""
