"""LPIPS: batched perceptual distances and the augmented support set."""
