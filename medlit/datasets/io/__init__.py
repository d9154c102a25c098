"""File and volume I/O and the case cache, shared by every dataset."""
