"""The model contract: the manifest describing a saved model and how to feed it."""
