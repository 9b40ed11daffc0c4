"""Evaluations: data (Gutenberg, MT-Bench), exact chunked streaming, perplexity, the sweep, stability,
StreamEval, the endless chat and the sink grid. Each computes; the commands write and plot."""
