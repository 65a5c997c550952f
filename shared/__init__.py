"""Code both stages use, written once: flow/diffusion maths, network blocks, data, training loop, metrics."""
