"""A class-conditional DiT's samples depend on their label: a tiny DiT trained on latents whose class decides their
sign samples each class on its own side, from the same noise, and guidance separates the classes further."""
import torch

from stage2_ldm.dit import build_dit
from stage2_ldm.objective import FlowObjective
from tests.helpers import load_config


def trained_two_class_dit() -> torch.nn.Module:
    """dit_tiny on 4×8×8 latents: class 0 is +1 + noise, class 1 is −1 + noise (0.3), 150 Adam steps."""
    torch.manual_seed(0)
    cfg = load_config(["ldm=dit_tiny", "ldm.learn_sigma=false", "ldm.objective=flow"]).ldm
    model = build_dit(cfg, in_channels=4, input_size=8, num_classes=2)
    objective = FlowObjective(t_sampling="uniform")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(150):
        labels = torch.randint(0, 2, (32,))
        sign = 1.0 - 2.0 * labels.float()
        latents = sign[:, None, None, None] + 0.3 * torch.randn(32, 4, 8, 8)
        loss, _ = objective.loss(model, latents, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_samples_of_a_conditional_dit_follow_their_label_and_guidance_separates_them():
    torch.set_num_threads(1)
    model = trained_two_class_dit()
    objective = FlowObjective(t_sampling="uniform")
    noise = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    means = {}
    for scale in (1.0, 4.0):
        for label in (0, 1):
            samples = objective.sample(model, noise, torch.full((16,), label), cfg_scale=scale, steps=10)
            means[scale, label] = samples.mean(dim=(1, 2, 3))  # (16,) one mean per sample
    # the same noise, another label: every sample lands on its class's side
    assert (means[1.0, 0] > 0.3).all() and (means[1.0, 1] < -0.3).all()
    assert (means[4.0, 0] > 0.3).all() and (means[4.0, 1] < -0.3).all()
    # guidance pushes the classes apart: a larger gap between the two labels' samples of the same noise
    gap = {scale: (means[scale, 0] - means[scale, 1]).mean() for scale in (1.0, 4.0)}
    assert gap[4.0] > gap[1.0] + 0.1
