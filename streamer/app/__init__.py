"""The application: the daemon (composition root), the CLI, configuration, the demo's Redis."""
