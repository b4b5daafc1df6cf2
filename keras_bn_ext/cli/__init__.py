"""Command-line tools: thin shells over the library API."""
