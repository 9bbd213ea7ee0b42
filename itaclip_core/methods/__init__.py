"""Training-free CLIP segmentation methods beyond ITACLIP and SCLIP, as pure functions of the image tower."""
