//! A convolution's zero padding, a leaf both convolution layouts (`conv`, `conv_channels_last`)
//! share, so that neither imports the other for it.

/// Zero padding on each side of the input, in input pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding {
    /// Rows added above.
    pub top: usize,
    /// Rows added below.
    pub bottom: usize,
    /// Columns added on the left.
    pub left: usize,
    /// Columns added on the right.
    pub right: usize,
}

impl Padding {
    /// The same padding on all four sides, as torch's `Conv2d(padding=p)`.
    pub fn uniform(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    /// Only below and on the right: diffusers' `Downsample2D(padding=0)`, which pads `(0, 1, 0, 1)`.
    pub fn bottom_right(p: usize) -> Self {
        Self {
            bottom: p,
            right: p,
            ..Self::default()
        }
    }

    pub(crate) fn is_uniform(&self) -> bool {
        self.top == self.bottom && self.top == self.left && self.top == self.right
    }
}
