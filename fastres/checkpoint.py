"""Checkpoint loading (placeholder until the checkpoint layouts land: fastres' own only)."""

import torch


def load_checkpoint(model, checkpoint, strict=True):
    state = torch.load(checkpoint, map_location="cpu") if isinstance(checkpoint, str) else checkpoint
    model.load_state_dict(state, strict=strict)
    return model
