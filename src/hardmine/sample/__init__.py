"""hardmine.sample."""
