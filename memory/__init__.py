"""The rolling compressed token memory of every stream.

``bank.MemoryBank`` is the entry point (budget shares, appends, gaps, forgetting, views, stats,
snapshots). The math lives in small pure modules: ``capacity`` (budget arithmetic), ``merge``
(size-weighted token merging), ``consolidation`` (merge/thin/forget plans over the index),
``selection`` (segments for a query). ``arena`` executes plans on the device tensor, ``view``
gives queries a consistent read, ``snapshot`` reads and writes files.
"""
