"""Evaluation helpers (data fetching; perplexity and friends arrive with the evaluation issue)."""
