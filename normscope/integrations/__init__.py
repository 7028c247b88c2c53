"""Training-framework integrations of :class:`normscope.Monitor` (optional extras)."""
