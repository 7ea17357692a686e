"""Command-line tools that prepare data."""
