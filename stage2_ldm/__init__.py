"""Stage 2: a class-conditional DiT trained on cached, normalised tokenizer latents (dit.py: the network,
objective.py: DDPM or rectified-flow loss and sampling)."""
