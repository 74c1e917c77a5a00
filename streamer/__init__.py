"""flashwatch's sources, pipeline, engine, daemon and command line."""

__version__ = "0.1.0"
