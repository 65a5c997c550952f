"""The one training loop both stages use, with its checkpoints and EMA."""
