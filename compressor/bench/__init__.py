"""Latency methodology, host description, and the report (JSON contract, Markdown, terminal)."""
