"""hardmine.report."""
