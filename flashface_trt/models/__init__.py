"""PyTorch definitions of the FlashFace networks and their weight loaders."""
