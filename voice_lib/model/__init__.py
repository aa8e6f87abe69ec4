"""The network and its checkpoints: the shipped base, save/load, LoRA wrapping."""
