"""Readers for every mammography source; see `read_image` and `lesion_masks`."""
