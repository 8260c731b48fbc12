"""One pack of tiles from message to stored rows, the same locally and in the cloud."""
