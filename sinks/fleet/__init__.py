"""A fleet of daemons on one Redis: leases, placement, routing, merged answers, status."""
