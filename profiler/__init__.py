"""How measurements get in: power sources, importers, the run store and its schema."""
