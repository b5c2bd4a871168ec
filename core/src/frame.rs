//! Frames as hosts hand them over: pixel formats, strides, sizes.
