"""Stage one: DreamBooth with prior preservation."""
