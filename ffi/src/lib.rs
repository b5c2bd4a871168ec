//! C ABI for sdstream (see `include/sdstream.h`).
