"""The datasets (fetch, checksums, splits), the batched augmentation and pixel conversions."""
