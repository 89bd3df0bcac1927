"""llamba: batch jobs over local LLMs (generation and exact classification)."""

__version__ = "0.1.0"
