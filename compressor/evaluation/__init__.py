"""`lowrank.evaluate`: perplexity, agreement, speed, encoder similarity, lm-eval pass-through."""
