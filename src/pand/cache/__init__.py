"""Caches that make distillation run at the speed of training the student alone."""

from pand.cache.images import CachedImageDataset, DecodedImageCache, with_decoded_cache

__all__ = ["CachedImageDataset", "DecodedImageCache", "with_decoded_cache"]
