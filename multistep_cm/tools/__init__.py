"""Command-line tools: converters of outside weights (Inception, CLIP) and
the writer of captioned-image data."""
