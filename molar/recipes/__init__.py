"""Training recipes: how a model is trained (data batches, loss, the fit loop), apart from the model files."""
