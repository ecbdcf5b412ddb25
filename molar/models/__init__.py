"""Recommendation models, one per module (popularity, sasrec, mirm, dueg); import them by module."""
