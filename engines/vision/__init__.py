"""Image and clip numerics shared by training and serving: decoding, detector pre/post-processing, clip windows."""
