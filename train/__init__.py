"""Losses, open_clip towers, the WebDataset loader, the training loop and evaluation."""
