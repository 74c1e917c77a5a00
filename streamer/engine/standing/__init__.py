"""Standing queries: conditions evaluated as clips land, and scheduled summaries."""
